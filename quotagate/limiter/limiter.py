"""The limiter's one interface to the gateway: ``Limiter.decide(env, kind, cost)``.

It knows Redis, Lua, meters and the failure policy, and nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Literal, NamedTuple

from quotagate.clock import Clock, StoreClock
from quotagate.limiter import keys
from quotagate.limiter.cluster import ClusterStore, slot_of
from quotagate.limiter.codes import Flag, Outcome
from quotagate.limiter.errors import NoScript, StoreError, StoreTimeout, StoreUnavailable
from quotagate.limiter.scripts import DECIDE, Script
from quotagate.limiter.store import PipelinedStore, pack_command

log = logging.getLogger("quotagate.limiter")

FailurePolicy = Literal["open", "closed"]


class Decision(NamedTuple):
    """One decision, in decide.lua's reply order (a tuple: built once per request)."""

    outcome: Outcome
    flags: Flag = Flag.NONE
    qps_limit: int = 0
    qps_remaining: int = 0
    qps_reset_ms: int = 0
    #: The calls meter: plan quota, and what plan + valid packs still hold.
    quota: int = 0
    remaining: int = 0
    #: Until the billing cycle resets.
    reset_ms: int = 0
    retry_after_ms: int = 0
    #: The billing cycle's length.
    window_s: int = 0
    #: The meter that refused ("" when admitted).
    meter: str = ""
    #: Admitted without a decision because the store was unreachable (fail-open).
    store_bypassed: bool = False

    @property
    def admitted(self) -> bool:
        """Let through: admitted, or refused only in shadow mode."""
        return self.outcome is Outcome.ADMITTED or bool(self.flags & Flag.SHADOW_REFUSAL)

    @classmethod
    def from_reply(cls, r: list) -> Decision:
        return cls(_OUTCOMES[r[0]], _FLAGS[r[1]], r[2], r[3], r[4], r[5], r[6], r[7], r[8],
                   r[9], r[10].decode(), False)


_OUTCOMES = tuple(Outcome)
_FLAGS = tuple(Flag(i) for i in range(16))

BYPASSED = Decision(Outcome.ADMITTED, store_bypassed=True)


#: Fail-open usage is summed per slot of this length and written back at the slot's start, so
#: it lands on the right day and cycle (every zone's midnight is on a 15-minute boundary).
SLOT_MS = 15 * 60 * 1000
#: Write-back attempts that find no snapshot (store lost its data) before an entry is given up.
MAX_MISSING_ATTEMPTS = 20

BacklogKey = tuple[str, str, int]  # env, route kind, slot start (epoch ms)


class Backlog:
    """Usage admitted while the store was unreachable, summed per (env, kind, 15-min slot),
    written back later.

    Bounded: past ``max_entries`` keys further usage is counted in ``dropped`` and logged,
    never held without limit.
    """

    def __init__(self, max_entries: int = 100_000):
        self.max_entries = max_entries
        self.pending: dict[BacklogKey, int] = {}
        self.missing_attempts: dict[BacklogKey, int] = {}
        self.dropped = 0
        self.written = 0

    def add(self, key: BacklogKey, cost: int) -> None:
        if key in self.pending:
            self.pending[key] += cost
        elif len(self.pending) < self.max_entries:
            self.pending[key] = cost
        else:
            self.dropped += cost
            log.error("fail-open backlog full (%d entries): usage of %s dropped",
                      self.max_entries, key[0])

    def remove(self, key: BacklogKey, cost: int) -> None:
        left = self.pending.get(key, 0) - cost
        if left > 0:
            self.pending[key] = left
        else:
            self.pending.pop(key, None)
            self.missing_attempts.pop(key, None)

    def total(self, env: str) -> int:
        return sum(c for (e, _, _), c in self.pending.items() if e == env)

    def __len__(self) -> int:
        return len(self.pending)


class Limiter:
    def __init__(
        self,
        store: PipelinedStore | ClusterStore,
        *,
        clock: Clock | None = None,
        mode: Literal["enforce", "shadow"] = "enforce",
        burst_ms: int = 100,
        on_failure: FailurePolicy = "open",
        script: Script = DECIDE,
        on_missing: Callable[[str], None] | None = None,
    ):
        self.store = store
        # Every new connection loads the script first: a restarted store has it at once.
        store.setup = (pack_command("SCRIPT", "LOAD", script.body),)
        self.clock = clock or StoreClock()
        self.mode = mode
        self.burst_ms = burst_ms
        self.on_failure = on_failure
        self.script = script
        #: Called with an env id whose snapshot the store does not have (e.g. it lost its data).
        self.on_missing = on_missing
        self.backlog = Backlog()
        self._evalsha_head = (
            b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n5\r\n" % (3 + 5 + 5, script.sha.encode())
        )
        self._burst = str(burst_ms).encode()
        self._drainer: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._key_cache: dict[str, tuple[bytes, int]] = {}
        self.script_reloads = 0

    def _keys_packed(self, env: str) -> tuple[bytes, int]:
        """The KEYS part of the command and their cluster slot, cached per env (bounded)."""
        cached = self._key_cache.get(env)
        if cached is None:
            if len(self._key_cache) >= 65536:
                self._key_cache.clear()
            names = keys.decision_keys(env)
            packed = b"".join(b"$%d\r\n%s\r\n" % (len(k), k) for k in map(str.encode, names))
            cached = self._key_cache[env] = (packed, slot_of(names[0]))
        return cached

    def _packed(self, env: str, kind: str, cost: int, mode: str, now_ms: int) -> bytes:
        parts = [self._evalsha_head, self._keys_packed(env)[0]]
        for arg in (str(now_ms).encode(), kind.encode(), str(cost).encode(), mode.encode(),
                    self._burst):
            parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        return b"".join(parts)

    async def _run(self, env: str, kind: str, cost: int, mode: str, now_ms: int,
                   late: Callable[[Decision | None], None] | None = None) -> Decision:
        """One decision. ``late``: told the outcome of a command that timed out, if it ran."""
        slot = self._keys_packed(env)[1]
        fut = self.store.submit(self._packed(env, kind, cost, mode, now_ms), slot)
        try:
            reply = await fut
        except NoScript:
            # Store flushed its scripts (SCRIPT FLUSH, or a restart without our reconnect):
            # EVAL the body once, which caches it again.
            self.script_reloads += 1
            log.info("script %s missing in store, reloading", self.script.name)
            fut = self.store.submit(pack_command(
                "EVAL", self.script.body, 5, *keys.decision_keys(env), now_ms, kind, cost, mode,
                self.burst_ms), slot)
            try:
                reply = await fut
            except StoreTimeout:
                self._watch_late(fut, late)
                raise
        except StoreTimeout:
            self._watch_late(fut, late)
            raise
        decision = Decision.from_reply(reply)
        if decision.outcome is Outcome.NOT_FOUND and self.on_missing is not None:
            self.on_missing(env)
        return decision

    def _watch_late(self, fut: asyncio.Future, late: Callable[[Decision | None], None] | None
                    ) -> None:
        if late is None:
            return

        def told(reply: object) -> None:
            ok = isinstance(reply, list)
            late(Decision.from_reply(reply) if ok else None)  # type: ignore[arg-type]

        self.store.when_late(fut, told)

    async def decide(self, env: str, kind: str, cost: int) -> Decision:
        """Admit or refuse one request; on an unreachable store apply the failure policy.

        Raises ``StoreUnavailable`` only when the policy is ``closed``.
        """
        key: BacklogKey | None = None

        def late(decision: Decision | None) -> None:
            # The timed-out call ran after all: if it counted the cost, the backlog must not.
            if key is not None and decision is not None and (
                    decision.admitted and not decision.flags & Flag.MODE_OFF):
                self.backlog.remove(key, cost)

        try:
            return await self._run(env, kind, cost, self.mode, self.clock.now_ms(), late)
        except StoreUnavailable:
            if self.on_failure == "closed":
                raise
            wall = self.clock.wall_ms()
            key = (env, kind, wall - wall % SLOT_MS)
            self.backlog.add(key, cost)
            self._start_drainer()
            return BYPASSED

    async def load_scripts(self) -> None:
        """Cache the scripts in the store (``/readyz`` needs them)."""
        await self.store.execute_all("SCRIPT", "LOAD", self.script.body)

    async def scripts_loaded(self) -> bool:
        replies = await self.store.execute_all("SCRIPT", "EXISTS", self.script.sha)
        return all(reply and reply[0] == 1 for reply in replies)

    # ------------------------------------------------------------- fail-open write-back

    def _start_drainer(self) -> None:
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain_loop())

    async def _drain_loop(self) -> None:
        delay = self.store.retry_interval
        while self.backlog.pending:
            await asyncio.sleep(delay)
            try:
                await self.flush_backlog()
            except StoreError as exc:
                log.warning(
                    "store still unavailable (%s); %d usage entries held for write-back",
                    exc, len(self.backlog),
                )
            delay = min(delay * 2, 5.0) if self.backlog.pending else self.store.retry_interval

    async def flush_backlog(self) -> int:
        """Write back what passed while the store was down; returns the entries written.

        Each entry is recorded at its slot's start time (its day and cycle), through the same
        script in ``record`` mode (no QPS, never refused). One flush at a time.
        """
        async with self._flush_lock:
            written = 0
            for key, cost in list(self.backlog.pending.items()):
                env, kind, slot_ms = key
                decision = await self._run(env, kind, cost, "record", slot_ms)
                if decision.outcome is Outcome.NOT_FOUND:
                    attempts = self.backlog.missing_attempts.get(key, 0) + 1
                    self.backlog.missing_attempts[key] = attempts
                    if attempts >= MAX_MISSING_ATTEMPTS:
                        log.error("usage of %s (%d %s) lost: the store has no such environment",
                                  env, cost, kind)
                        self.backlog.dropped += cost
                        self.backlog.remove(key, self.backlog.pending.get(key, 0))
                    continue
                # Only what was written leaves the backlog; more may have been added meanwhile.
                self.backlog.remove(key, cost)
                written += 1
            self.backlog.written += written
            if written:
                log.info("wrote back %d usage entries admitted while the store was down",
                         written)
            return written

    async def close(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        await self.store.close()
