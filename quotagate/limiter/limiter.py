"""The limiter: what the gateway's front doors see of it — ``decide`` before a request,
``release``, ``meter`` and ``refund`` after it, ``renew`` of the slots held, ``ingest`` of
usage records, ``close``. It knows Redis, Lua, meters, leases and the failure policy, and
nothing of HTTP.

This module is the facade and the failure policy; each concern is a module of its own:

- ``decision.py``   one decision: decide.lua's call, packed for the hot path, and its reply;
- ``calls.py``      calling the Lua code: functions or scripts, code the store lost sent again;
- ``leases.py``     slots held by this instance and their renewal;
- ``settling.py``   releases, meters and refunds after a response, batched per loop iteration;
- ``backlog.py``    usage admitted while the store was away (fail-open), journaled;
- ``writeback.py``  writing that backlog back, and stopped gateways' journals;
- ``forwarding.py`` the scripts' events moved to the global stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from quotagate.common.clock import Clock, StoreClock, script_arg
from quotagate.limiter import keys
from quotagate.limiter.backlog import SLOT_MS, Backlog, BacklogKey
from quotagate.limiter.bandwidth import Bandwidth
from quotagate.limiter.calls import SETTLE_REFUSED, ScriptCalls, SettleRefused
from quotagate.limiter.cluster import ClusterStore
from quotagate.limiter.codes import Flag, Outcome
from quotagate.limiter.decision import BYPASSED, BYPASSED_HOLDING, Decider, Decision
from quotagate.limiter.errors import StoreError, StoreUnavailable, count_store_error
from quotagate.limiter.forwarding import EventForwarder
from quotagate.limiter.hot import Hot
from quotagate.limiter.leases import Leases
from quotagate.limiter.settling import Settler
from quotagate.limiter.store import PipelinedStore
from quotagate.limiter.writeback import WriteBack

__all__ = ["Decision", "FailurePolicy", "Limiter", "new_instance_id"]

log = logging.getLogger("quotagate.limiter")

FailurePolicy = Literal["open", "closed"]

#: Environments remembered as known to exist (beyond it, only declared ones are added).
MAX_KNOWN = 1_000_000


def new_instance_id() -> str:
    """Unique per process: host, pid and a random part (no ``|`` or ``=``, used in fields)."""
    host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())[:40]
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


class Limiter:
    def __init__(
        self,
        store: PipelinedStore | ClusterStore,
        *,
        clock: Clock | None = None,
        mode: Literal["enforce", "shadow"] = "enforce",
        burst_ms: int = 100,
        on_failure: FailurePolicy = "open",
        on_missing: Callable[[str], None] | None = None,
        instance: str | None = None,
        lease_ms: int = 15_000,
        renew_interval_ms: int = 5_000,
    ):
        self.store = store
        self.clock = clock or StoreClock()
        self.on_failure = on_failure
        #: Called with an env id whose snapshot the store does not have (e.g. it lost its data).
        self.on_missing = on_missing
        self.instance = instance or new_instance_id()
        self.lease_ms = lease_ms
        #: Environments known to exist (declared, or a snapshot seen): only they are
        #: admitted fail-open while the store is away.
        self.known: set[str] = set()
        self._mode = mode
        self._calls = ScriptCalls(store)
        self._events = EventForwarder(self._calls, self.instance, self.clock)
        self._decider = Decider(self._calls, self.instance, lease_ms, burst_ms,
                                self._missing, self._events.soon)
        self._writeback = WriteBack(self._calls, self._decider, self._missing)
        self._settler = Settler(self._calls, self.clock, self.instance, mode, self._writeback,
                                self._events.soon)
        self._leases = Leases(self._calls, self.clock, self.instance, lease_ms,
                              renew_interval_ms, self._settler)
        #: Slots of plugin-mode holders being given back.
        self._background: set[asyncio.Task[None]] = set()
        #: Hot environments, decided in memory from leased budgets (hot.py).
        self.hot = Hot(self._calls, self.instance, lambda: self._mode,
                       lambda: self.clock.script_time(), self._events.soon, self._missing,
                       lambda: self.clock.now_ms())
        #: Response bandwidth of environments with a gateway version, shaped across instances.
        self.bandwidth = Bandwidth(self._calls, lambda: self.on_failure,
                                   mode=lambda: self._mode,
                                   script_time=lambda: self.clock.script_time())

    def _missing(self, env: str) -> None:
        if self.on_missing is not None:
            self.on_missing(env)

    # ------------------------------------------------------------------------ settings

    @property
    def mode(self) -> str:
        """"enforce" or "shadow" (refusals counted, not enforced); set at a reload."""
        return self._mode

    @mode.setter
    def mode(self, mode: Literal["enforce", "shadow"]) -> None:
        self._mode = mode
        self._settler.mode = mode

    @property
    def burst_ms(self) -> int:
        return self._decider.burst_ms

    def set_burst_ms(self, burst_ms: int) -> None:
        self._decider.set_burst_ms(burst_ms)

    # ------------------------------------------------------------------- what tests read

    @property
    def backlog(self) -> Backlog:
        return self._writeback.backlog

    @property
    def functions(self) -> bool:
        """Calling the function library (else scripts: the store refused it)."""
        return self._calls.functions

    @property
    def script_reloads(self) -> int:
        return self._calls.script_reloads

    @property
    def held(self) -> dict[str, dict[str, int]]:
        return self._leases.held

    @property
    def renewals(self) -> int:
        return self._leases.renewals

    @property
    def renew_commands(self) -> int:
        return self._leases.renew_commands

    @property
    def on_ended(self) -> Callable[[str, str], None] | None:
        """Told (env, status) when a renewal finds an environment isolated, released or
        unknown."""
        return self._leases.on_ended

    @on_ended.setter
    def on_ended(self, callback: Callable[[str, str], None] | None) -> None:
        self._leases.on_ended = callback

    # ------------------------------------------------------------------------ decisions

    def decide_now(self, env: str, kind: str, cost: int, needs: str = "") -> Decision | None:
        """``decide`` for a request without a slot (nor a pass while isolated), if this
        instance can decide it in memory now (a hot environment's lease); None: call
        ``decide``. (What ``decide`` does first, for callers that would rather not start a
        coroutine: loadtests/hot_bench.py.)"""
        if kind == "sms" or self._mode != "enforce":
            return None
        hot = self.hot.envs.get(env)
        return None if hot is None else hot.decide(kind, cost, needs)

    async def decide(self, env: str, kind: str, cost: int, slot: str = "",
                     needs: str = "", holder: str = "", holder_lease_ms: int = 0,
                     while_isolated: bool = False, in_memory: bool = True) -> Decision:
        """Admit or refuse one request; on an unreachable store apply the failure policy.

        ``slot`` ("rt:" or "fn:<name>"): also take a leased concurrency slot, given back with
        ``release``. ``needs``: a metered meter the request will use (refused once used up).
        ``holder`` (plugin mode): the slot is held by it — one request's own lease of
        ``holder_lease_ms``, given back by ``finish`` or ending with its lease — not by this
        instance (which never renews it). ``while_isolated``: an ``auth`` request that the
        store lets through, at no cost, while the environment is isolated or not started
        (``Flag.WHILE_ISOLATED``; a route's ``pass_while_isolated``). Raises
        ``StoreUnavailable`` only when the policy is ``closed``. ``in_memory=False``: the
        caller asked ``decide_now`` already (it counts the request's demand once).
        """
        leasable = not slot and not while_isolated
        if leasable and in_memory:
            local = self.decide_now(env, kind, cost, needs)
            if local is not None:
                return local
        key: BacklogKey | None = None
        finish: Callable[[Decision], bool] | None = None
        abandoned: Callable[[Decision | None], None] | None = None
        own = slot and not holder  # a slot this instance holds (and renews)
        if own:
            finish, abandoned = self._leases.acquiring(env, slot)
        elif slot:
            def abandoned(decision: Decision | None) -> None:  # the caller went away
                if decision is not None and decision.admitted and decision.in_use > 0:
                    self._release_for(env, holder, slot)

        def late(decision: Decision | None) -> None:
            # The timed-out call ran after all (it was charged just now, by the store).
            if decision is None or not decision.admitted or decision.flags & Flag.MODE_OFF:
                return
            refundable = decision.charged_calls(kind)
            if key is not None:
                # Admitted fail-open, and its cost is in the backlog (perhaps in a write-back
                # in flight, or journaled): the backlog keeps it, and what the store just
                # charged is given back — one rule whatever came first. SMS (no refund): taken
                # out of the backlog instead.
                if refundable:
                    self.refund(env, "calls", cost, self.clock.now_ms())
                elif kind == "sms":
                    self._writeback.backlog.remove(key, cost)
                return
            # Refused (503): nothing it counted may stay — the slot given back, the calls
            # too (once: this runs once per timed-out call).
            if slot and decision.in_use > 0:
                if holder:
                    self._release_for(env, holder, slot)
                else:
                    self._settler.queue(env, slot, None, 1)
            if refundable:
                self.refund(env, "calls", cost, self.clock.now_ms())

        try:
            decision = await self._decider.run(env, kind, cost, self._mode,
                                               self.clock.script_time(), late, slot, needs,
                                               abandoned, holder, holder_lease_ms,
                                               while_isolated)
        except StoreUnavailable as exc:
            count_store_error(exc)
            if self.on_failure == "closed":
                if own:
                    self._leases.hold(env, slot, -1)
                raise
            # Fail-open, only for environments known to exist (the config, the store's
            # snapshots seen, the API's list), and while the backlog has room: anything else
            # is refused (503), not admitted uncounted. A slot stays held here; the next
            # renewal writes it to the store.
            passed = self.clock.now_ms()
            entry = (env, kind, passed - passed % SLOT_MS)
            if env not in self.known or not self._writeback.backlog.admit(entry, cost):
                if own:
                    self._leases.hold(env, slot, -1)
                raise StoreUnavailable(
                    "store unreachable" + ("" if env in self.known else
                                           f"; {env} is not known to exist here")) from None
            key = entry  # kept: a late reply takes it out again
            self._writeback.start()
            return BYPASSED_HOLDING if own else BYPASSED
        except StoreError as exc:
            count_store_error(exc)
            if own:
                self._leases.hold(env, slot, -1)
            raise
        if env not in self.known and decision.outcome is not Outcome.NOT_FOUND \
                and len(self.known) < MAX_KNOWN:
            self.known.add(env)  # its snapshot is in the store: it exists
        if leasable and kind != "sms" and self._mode == "enforce":
            self.hot.note(env, bool(decision.flags & Flag.HOT))
        if finish is not None and finish(decision):
            return Decision._make((*decision[:-1], True))  # (_replace is slow)
        return decision

    # ------------------------------------------------------------------- after a response

    async def finish(self, env: str, holder: str, slot: str, meters: dict[str, int],
                     once_ms: int = 0) -> bool:
        """Plugin mode, the proxy's done call for a decision made with ``holder``: its slot
        given back and ``meters`` charged (a refund as "-<meter>@<ms>"), in one settle call.
        ``once_ms`` > 0: the decision's done call, once — the first the store takes marks the
        decision seen (kept ``once_ms``) in the same script call, whatever it carries (meters
        or none), so a retry, a replay or another instance's copy changes nothing.
        A store that cannot take it now: the same call is sent again in the background
        (under the same id) until taken. False when the store had seen the decision's done
        call before (nothing written), else True. Raises ``SettleRefused`` when the store
        refuses it whole (out of bounds: nothing written, logged), ``StoreError`` for another
        error."""
        names = keys.settle_keys(env)
        if once_ms > 0:
            names = [*names, keys.seen(env, "done:" + holder)]
        args: list[str | int] = [script_arg(self.clock.script_time()), holder, self._mode,
                                 1 if slot else 0, *((slot, 1) if slot else ())]
        for meter, amount in meters.items():
            args += (meter, amount)
        if once_ms > 0:
            args.append(once_ms)  # (settle.lua: one last value, how long it is seen)
        what = f"done call of {env} ({holder}): its usage"
        try:
            reply = await self._calls.settle(env, names, args)
        except StoreUnavailable:
            self._settler.send_again(env, names, lambda: args, what, until_snapshot=True)
            return True
        if reply[0] == SETTLE_REFUSED:
            raise SettleRefused(f"the store refused the {what} whole: nothing was written")
        if reply[0] == 4 and meters:  # no snapshot (yet): the store lost its data?
            self._missing(env)
            self._settler.send_again(env, names, lambda: args, what, until_snapshot=True)
        elif reply[1] & Flag.EVENTS:
            self._events.soon(env)
        return reply[0] != 8  # (8: seen before)

    def _release_for(self, env: str, holder: str, slot: str) -> None:
        """Give back ``holder``'s slot (a decision whose caller is gone), in the background."""
        task = asyncio.get_running_loop().create_task(self._release_quietly(env, holder, slot))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release_quietly(self, env: str, holder: str, slot: str) -> None:
        try:
            await self.finish(env, holder, slot, {})
        except StoreError as exc:
            log.warning("slot %s of %s not given back now (%s): it ends with its lease",
                        slot, env, exc)

    def release(self, env: str, slot: str, n: int = 1) -> None:
        """Give back ``n`` slots taken by ``decide`` (or held through a store outage)."""
        self._leases.release(env, slot, n)

    def meter(self, env: str, meter: str, amount: int) -> None:
        """Charge ``amount`` of a metered meter after the response (never refuses)."""
        if amount > 0:
            self._settler.queue(env, None, meter, amount)

    def refund(self, env: str, meter: str, amount: int, charged_at_ms: int) -> None:
        """Give back ``amount`` of ``meter`` that ``decide`` charged at ``charged_at_ms``
        (settle.lua: the last taken first; nothing if the environment's day has changed
        since). Lost, not kept, if the store cannot take it: never written back later. Calls
        admitted from a lease and not yet told to the store are taken off its count."""
        if meter == "calls" and self.hot.refund(env, amount, charged_at_ms):
            return
        self._settler.refund(env, meter, amount, charged_at_ms)

    # --------------------------------------------------------------------------- leases

    def slots_held(self, env: str, slot: str) -> int:
        return self._leases.slots_held(env, slot)

    async def renew(self, lease_ms: int | None = None) -> dict[str, int]:
        """Renew the lease of every slot this instance holds (leases.py)."""
        return await self._leases.renew(lease_ms)

    def start_renewing(self) -> None:
        self._leases.start_renewing()

    # ------------------------------------------------------------------- the Lua code

    async def load_scripts(self) -> None:
        await self._calls.load_scripts()

    async def scripts_loaded(self) -> bool:
        return await self._calls.scripts_loaded()

    # ------------------------------------------------------------------ events, records

    async def forward_events(self, env: str) -> int:
        return await self._events.forward(env)

    def forward_events_soon(self, env: str) -> None:
        """Move ``env``'s events in the background, tried again if the store fails."""
        self._events.soon(env)

    async def ingest(self, env: str, record_id: str, meter: str, amount: int, at_ms: int
                     ) -> int:
        """Count one ingested usage record once, whatever the retries: 0 counted, 4 no such
        environment, 8 seen before. Raises StoreError when the store cannot be reached (the
        caller retries the batch; ids make that safe)."""
        reply = await self._calls.settle(env, [*keys.settle_keys(env), keys.seen(env, record_id)],
                                         [at_ms, self.instance, self._mode, 0, meter, amount])
        if reply[1] & Flag.EVENTS:
            self._events.soon(env)
        return int(reply[0])

    # ------------------------------------------------------------- fail-open write-back

    async def flush_backlog(self) -> int:
        return await self._writeback.flush()

    async def write_back(self, env: str, what: str, amount: int, at_ms: int,
                         record_id: str) -> bool:
        return await self._writeback.write_back(env, what, amount, at_ms, record_id)

    def open_journal(self, directory: Path) -> None:
        self._writeback.open_journal(directory)
        self.hot.open_journal(directory)

    async def recover_journals(self, directory: Path) -> int:
        return await self._writeback.recover_journals(directory)

    async def close(self, give_back: bool = True) -> None:
        """Stop; with ``give_back`` hand every held slot back first (a clean shutdown)."""
        # No new write-back or refund retry from here on (before the first await: a settle
        # failing meanwhile is logged as not sent); what is queued is settled now.
        self._settler.stop_retrying()
        await self.hot.stop()  # leases ended: counts told, what they held given back
        await self._writeback.stop()
        await self._leases.stop()
        await self._settler.stop()
        if give_back:
            await self._leases.give_back()
        await asyncio.sleep(0)
        await self.bandwidth.close()  # unused bandwidth being given back
        await self._events.finish()  # events being moved to the global stream
        if self._background:  # plugin-mode slots being given back
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.store.close()
        await asyncio.sleep(0)  # the callbacks of what the close failed (kept, journaled)
        self._settler.cancel_retries()
        self._writeback.close()
        self.hot.close()
