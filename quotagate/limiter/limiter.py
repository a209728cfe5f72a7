"""The limiter's one interface to the gateway: ``Limiter.decide(env, kind, cost)``.

It knows Redis, Lua, meters and the failure policy, and nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal, NamedTuple

import hiredis

from quotagate.clock import Clock, StoreClock
from quotagate.limiter import keys
from quotagate.limiter.codes import Flag, Outcome
from quotagate.limiter.errors import StoreError, StoreUnavailable
from quotagate.limiter.scripts import DECIDE, Script
from quotagate.limiter.store import PipelinedStore

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


class Backlog:
    """Usage admitted while the store was unreachable, summed per (env, kind), written back later.

    Bounded: past ``max_entries`` distinct (env, kind) pairs further usage is counted in
    ``dropped`` and logged, never held without limit.
    """

    def __init__(self, max_entries: int = 100_000):
        self.max_entries = max_entries
        self.pending: dict[tuple[str, str], int] = {}
        self.dropped = 0
        self.written = 0

    def add(self, env: str, kind: str, cost: int) -> None:
        key = (env, kind)
        if key in self.pending:
            self.pending[key] += cost
        elif len(self.pending) < self.max_entries:
            self.pending[key] = cost
        else:
            self.dropped += cost

    def __len__(self) -> int:
        return len(self.pending)


class Limiter:
    def __init__(
        self,
        store: PipelinedStore,
        *,
        clock: Clock | None = None,
        mode: Literal["enforce", "shadow"] = "enforce",
        burst_ms: int = 100,
        on_failure: FailurePolicy = "open",
        script: Script = DECIDE,
    ):
        self.store = store
        self.clock = clock or StoreClock()
        self.mode = mode
        self.burst_ms = burst_ms
        self.on_failure = on_failure
        self.script = script
        self.backlog = Backlog()
        self._evalsha_head = (
            b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n5\r\n" % (3 + 5 + 5, script.sha.encode())
        )
        self._burst = str(burst_ms).encode()
        self._drainer: asyncio.Task[None] | None = None
        self._key_cache: dict[str, bytes] = {}
        self.script_reloads = 0

    def _keys_packed(self, env: str) -> bytes:
        """The KEYS part of the command, cached per environment (bounded)."""
        packed = self._key_cache.get(env)
        if packed is None:
            if len(self._key_cache) >= 65536:
                self._key_cache.clear()
            packed = b"".join(
                b"$%d\r\n%s\r\n" % (len(k), k) for k in map(str.encode, keys.decision_keys(env))
            )
            self._key_cache[env] = packed
        return packed

    def _packed(self, env: str, kind: str, cost: int, mode: str) -> bytes:
        parts = [self._evalsha_head, self._keys_packed(env)]
        for arg in (
            str(self.clock.now_ms()).encode(),
            kind.encode(),
            str(cost).encode(),
            mode.encode(),
            self._burst,
        ):
            parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        return b"".join(parts)

    async def _run(self, env: str, kind: str, cost: int, mode: str) -> Decision:
        try:
            reply = await self.store.execute_packed(self._packed(env, kind, cost, mode))
        except hiredis.ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise StoreError(f"decide.lua failed: {exc}") from None
            # Store restarted or SCRIPT FLUSH: EVAL the body once, which caches it again.
            self.script_reloads += 1
            log.info("script %s missing in store, reloading", self.script.name)
            reply = await self.store.execute(
                "EVAL", self.script.body, 5, *keys.decision_keys(env),
                self.clock.now_ms(), kind, cost, mode, self.burst_ms,
            )
        return Decision.from_reply(reply)

    async def decide(self, env: str, kind: str, cost: int) -> Decision:
        """Admit or refuse one request; on an unreachable store apply the failure policy.

        Raises ``StoreUnavailable`` only when the policy is ``closed``.
        """
        try:
            return await self._run(env, kind, cost, self.mode)
        except StoreUnavailable:
            if self.on_failure == "closed":
                raise
            self.backlog.add(env, kind, cost)
            self._start_drainer()
            return BYPASSED

    async def load_scripts(self) -> None:
        """Cache the scripts in the store (``/readyz`` needs them)."""
        await self.store.execute("SCRIPT", "LOAD", self.script.body)

    async def scripts_loaded(self) -> bool:
        reply = await self.store.execute("SCRIPT", "EXISTS", self.script.sha)
        return bool(reply and reply[0] == 1)

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

    async def flush_backlog(self) -> int:
        """Write back what passed while the store was down; returns the entries written."""
        written = 0
        for (env, kind), cost in list(self.backlog.pending.items()):
            await self._run(env, kind, cost, "record")
            # Only what was written leaves the backlog; new usage may have been added meanwhile.
            left = self.backlog.pending.get((env, kind), 0) - cost
            if left > 0:
                self.backlog.pending[(env, kind)] = left
            else:
                self.backlog.pending.pop((env, kind), None)
            written += 1
        self.backlog.written += written
        if written:
            log.info("wrote back %d usage entries admitted while the store was down", written)
        return written

    async def close(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
        await self.store.close()

