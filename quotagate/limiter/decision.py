"""One decision: decide.lua's call, packed by hand for the hot path, and its reply.

``Decider.run`` sends the call and reads the reply; the failure policy (what happens when the
store cannot answer) is the ``Limiter``'s. A call that timed out may still run: its reply is
handed to ``late`` when it comes, so what it charged can be given back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import NamedTuple

from quotagate.common.clock import ScriptTime, script_arg
from quotagate.limiter import keys
from quotagate.limiter.calls import ScriptCalls
from quotagate.limiter.codes import Flag, Outcome
from quotagate.limiter.errors import NoScript, OutOfMemory, StoreError, StoreTimeout
from quotagate.limiter.scripts import DECIDE
from quotagate.limiter.store import pack_command

#: Outcomes decide.lua returns without charging anything (shadow mode admits them; an
#: isolated or not-started environment's request marked to pass goes through uncharged).
UNCHARGED = frozenset({Outcome.ISOLATED, Outcome.NOT_FOUND, Outcome.NOT_STARTED})
#: Flags that let a refusing outcome through: shadow mode, a pass while isolated.
_LET_THROUGH = Flag.SHADOW_REFUSAL | Flag.WHILE_ISOLATED
#: decide.lua's ARGV[10] for a request that may pass while isolated.
_PASS = b"$4\r\npass\r\n"


class Decision(NamedTuple):
    """One decision, in decide.lua's reply order (a tuple: built once per request)."""

    outcome: Outcome
    flags: int = Flag.NONE
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
    #: For a slot: its cap, and the live slots (this one included when admitted).
    cap: int = 0
    in_use: int = 0
    #: The gateway version's QPS applied (lower than the plan's), not the plan's.
    qps_by_gateway: bool = False
    #: The gateway version's bytes per second for responses (0: not capped).
    bandwidth: int = 0
    #: Admitted without a decision because the store was unreachable (fail-open).
    store_bypassed: bool = False
    #: This instance holds the slot asked for: give it back with ``Limiter.release``.
    slot_held: bool = False

    @property
    def admitted(self) -> bool:
        """Let through: admitted, refused only in shadow mode, or isolated and let through
        at no cost (``Flag.WHILE_ISOLATED``)."""
        return self.outcome is Outcome.ADMITTED or bool(self.flags & _LET_THROUGH)

    def charged_calls(self, kind: str) -> bool:
        """Whether decide.lua charged this request's calls, so a refund may give them back:
        not a bypassed one (its cost is in the write-back backlog), not one a database promo
        made free, not an early outcome shadow mode let through nor one let through while
        isolated (``Flag.WHILE_ISOLATED``: at no cost), not SMS (their cost went to SMS packs
        first)."""
        return not (self.store_bypassed or self.flags & Flag.DATABASE_FREE
                    or self.outcome in UNCHARGED or kind == "sms")

    @classmethod
    def from_reply(cls, r: list) -> Decision:
        return cls(_OUTCOMES[r[0]], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8],
                   r[9], r[10].decode(), r[11], r[12], r[13] == 1, r[14], False, False)


_OUTCOMES = tuple(Outcome)

BYPASSED = Decision(Outcome.ADMITTED, store_bypassed=True)
BYPASSED_HOLDING = Decision(Outcome.ADMITTED, store_bypassed=True, slot_held=True)

#: Told the decision of a call whose caller stopped waiting (None: it never ran).
Told = Callable[[Decision | None], None]


class Decider:
    """decide.lua's call for one request: ``run``."""

    def __init__(self, calls: ScriptCalls, instance: str, lease_ms: int, burst_ms: int,
                 on_missing: Callable[[str], None], on_events: Callable[[str], None]):
        self.calls = calls
        self.store = calls.store
        self.instance = instance
        self.lease_ms = lease_ms
        self.burst_ms = burst_ms
        self._burst = str(burst_ms).encode()
        self._tail = b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in (
            instance.encode(), str(lease_ms).encode()))
        #: Told an env id whose snapshot the store does not have; and one whose scripts
        #: wrote events to forward.
        self.on_missing = on_missing
        self.on_events = on_events

    def set_burst_ms(self, burst_ms: int) -> None:
        self.burst_ms = burst_ms
        self._burst = str(burst_ms).encode()

    def holder_tail(self, holder: str, lease_ms: int) -> bytes:
        """The instance and lease arguments of a slot held by ``holder`` (plugin mode: one
        request's own lease) instead of this instance."""
        return b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in (
            holder.encode(), str(lease_ms).encode()))

    def _packed(self, env: str, kind: str, cost: int, mode: str, at: ScriptTime, slot: str,
                needs: str, tail: bytes | None, while_isolated: bool) -> bytes:
        head = self.calls.decide_head_pass if while_isolated else self.calls.decide_head
        parts = [head, self.calls.keys_packed(env)[0]]
        for arg in (script_arg(at).encode(), kind.encode(), str(cost).encode(), mode.encode(),
                    self._burst, slot.encode()):
            parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        parts.append(self._tail if tail is None else tail)
        parts.append(b"$%d\r\n%s\r\n" % (len(needs), needs.encode()))
        if while_isolated:
            parts.append(_PASS)
        return b"".join(parts)

    async def run(self, env: str, kind: str, cost: int, mode: str, at: ScriptTime,
                  late: Told | None = None, slot: str = "", needs: str = "",
                  abandoned: Told | None = None, holder: str = "",
                  holder_lease_ms: int = 0, while_isolated: bool = False) -> Decision:
        """One decision. ``late``: told the outcome of a command that timed out, if it ran.
        ``abandoned``: told the outcome of a call whose caller was cancelled meanwhile.
        ``holder``: the slot is held by it for ``holder_lease_ms``, not by this instance.
        ``while_isolated``: an ``auth`` request that passes, at no cost, while the environment
        is isolated or not started (decide.lua's ARGV[10])."""
        key_slot = self.calls.keys_packed(env)[1]
        tail = self.holder_tail(holder, holder_lease_ms) if holder else None
        fut = self.store.submit(self._packed(env, kind, cost, mode, at, slot, needs, tail,
                                             while_isolated), key_slot)
        try:
            if abandoned is None:  # the plain path: one coroutine frame less than _reply
                try:
                    reply = await fut
                except StoreTimeout:
                    self._watch_late(env, fut, late)
                    raise
            else:
                reply = await self._reply(env, fut, late, abandoned)
        except (NoScript, OutOfMemory) as exc:
            # OutOfMemory: at maxmemory a function (which may write) is refused before it
            # runs; a script runs until it writes. So as a script a refusal, which writes
            # nothing, is still decided, as it was before functions; an admission fails its
            # write as before.
            if isinstance(exc, OutOfMemory) and not self.calls.functions:
                raise
            reply = await self._decide_again(env, key_slot, (
                script_arg(at), kind, cost, mode, self.burst_ms, slot, holder or self.instance,
                holder_lease_ms if holder else self.lease_ms, needs,
                *(("pass",) if while_isolated else ())), late, abandoned, exc)
        decision = Decision.from_reply(reply)
        if decision.outcome is Outcome.NOT_FOUND:
            self.on_missing(env)
        if decision.flags & Flag.EVENTS:
            self.on_events(env)
        return decision

    async def _decide_again(self, env: str, key_slot: int, args: tuple, late: Told | None,
                            abandoned: Told | None, exc: StoreError) -> list:
        """decide.lua as a script, after the function call failed with ``exc``: the store
        lost the code (NoScript), or is at maxmemory (OutOfMemory)."""
        names = keys.decision_keys(env)
        if isinstance(exc, NoScript):
            return await self._reply(env, self.calls.reload(DECIDE, names, key_slot, args,
                                                            exc), late, abandoned)
        fut = self.store.submit(pack_command("EVALSHA", DECIDE.sha, len(names), *names, *args),
                                key_slot)
        try:
            return await self._reply(env, fut, late, abandoned)
        except NoScript as missing:
            return await self._reply(env, self.calls.reload(DECIDE, names, key_slot, args,
                                                            missing), late, abandoned)

    async def _reply(self, env: str, fut: asyncio.Future, late: Told | None,
                     abandoned: Told | None) -> list:
        try:
            # Shielded when the outcome matters after a cancellation (a slot): the reply is
            # then handed to ``abandoned``.
            return await (fut if abandoned is None else asyncio.shield(fut))
        except StoreTimeout:
            self._watch_late(env, fut, late)
            raise
        except asyncio.CancelledError:
            if abandoned is not None:
                def told(f: asyncio.Future) -> None:
                    ok = not f.cancelled() and f.exception() is None
                    decision = Decision.from_reply(f.result()) if ok else None
                    self._events_of(env, decision)
                    abandoned(decision)
                fut.add_done_callback(told)
            raise

    def _events_of(self, env: str, decision: Decision | None) -> None:
        if decision is not None and decision.flags & Flag.EVENTS:
            self.on_events(env)

    def _watch_late(self, env: str, fut: asyncio.Future, late: Told | None) -> None:
        """A reply that comes after its timeout: told to ``late``, and the events it wrote
        moved like any other's (else they would wait for the environment's next lifecycle
        work, maybe months away)."""
        def told(reply: object) -> None:
            ok = isinstance(reply, list)
            decision = Decision.from_reply(reply) if ok else None  # type: ignore[arg-type]
            self._events_of(env, decision)
            if late is not None:
                late(decision)

        self.store.when_late(fut, told)
