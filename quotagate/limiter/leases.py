"""Leased slots (realtime watches, function invocations) and their renewal.

Slots are leased to this instance: ``held`` is what it holds, per environment and slot; a
renewal writes those counts, absolute, for all its environments in one script call per batch,
so the store converges on the truth every interval whatever was lost in between (a timed-out
call, a store restart, a lease reaped while this instance could not reach the store).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import NamedTuple

from quotagate.common import metrics
from quotagate.common.aio import pause, stop_if_cancelling
from quotagate.common.clock import Clock, script_arg
from quotagate.limiter import keys
from quotagate.limiter.calls import ScriptCalls
from quotagate.limiter.cluster import ClusterStore
from quotagate.limiter.codes import Flag
from quotagate.limiter.decision import Decision
from quotagate.limiter.errors import NoScript, StoreError, count_store_error
from quotagate.limiter.scripts import RENEW
from quotagate.limiter.settling import Settler

log = logging.getLogger("quotagate.limiter")

#: Environments per renewal call: bounds how long one renewal holds the store.
RENEW_BATCH = 256
#: Renewal statuses (renew.lua) that end an environment's watches.
ENDED = {3: "isolated", 4: "not-found", 5: "not-started", 7: "missing"}


class _RenewCall(NamedTuple):
    envs: list[str]
    fut: asyncio.Future
    names: list[str]
    args: list[str | int]
    key_slot: int


class Leases:
    def __init__(self, calls: ScriptCalls, clock: Clock, instance: str, lease_ms: int,
                 renew_interval_ms: int, settler: Settler):
        self.calls = calls
        self.clock = clock
        self.instance = instance
        self.lease_ms = lease_ms
        self.renew_interval = renew_interval_ms / 1000
        self.settler = settler
        #: env -> slot -> slots this instance holds (admitted ones, and acquisitions in flight).
        self.held: dict[str, dict[str, int]] = {}
        #: env -> renewals submitted: an acquisition refused after a renewal counted it must
        #: be given back.
        self._renewals: dict[str, int] = {}
        self._renewer: asyncio.Task[None] | None = None
        #: Told (env, status) when a renewal finds an environment isolated, released or unknown.
        self.on_ended: Callable[[str, str], None] | None = None
        self.renewals = 0
        self.renew_commands = 0

    def hold(self, env: str, slot: str, n: int) -> None:
        held = self.held.get(env)
        if held is None:
            held = self.held[env] = {}
        held[slot] = max(0, held.get(slot, 0) + n)  # zeros stay until a renewal sends them

    def release(self, env: str, slot: str, n: int = 1) -> None:
        """Give back ``n`` slots (held, and counted in the store)."""
        self.hold(env, slot, -n)
        self.settler.queue(env, slot, None, n)

    def slots_held(self, env: str, slot: str) -> int:
        return self.held.get(env, {}).get(slot, 0)

    def acquiring(self, env: str, slot: str
                  ) -> tuple[Callable[[Decision], bool], Callable[[Decision | None], None]]:
        """A slot about to be asked for: held from now on (a renewal sent while the decision
        is in flight counts it). Returns how the decision ends: ``finish`` (the reply came:
        whether the store took the slot) and ``abandoned`` (the caller was cancelled first;
        told the reply when it comes)."""
        if env in self.settler.pending:  # slots given back first: they may make room
            self.settler.flush_env(env)
        self.hold(env, slot, 1)
        renewals = self._renewals.get(env, 0)

        def finish(decision: Decision) -> bool:
            """Whether the store took the slot; if not, undo the local hold."""
            if (decision.admitted and not decision.flags & Flag.MODE_OFF
                    and decision.in_use > 0):
                return True
            self.hold(env, slot, -1)
            if self._renewals.get(env, 0) != renewals:
                # A renewal sent while this was in flight counted it: take it back out.
                self.settler.queue(env, slot, None, 1)
            return False

        def abandoned(decision: Decision | None) -> None:
            if decision is None:
                self.hold(env, slot, -1)  # never answered: the next renewal is the truth
            elif finish(decision):
                self.release(env, slot)

        return finish, abandoned

    async def renew(self, lease_ms: int | None = None) -> dict[str, int]:
        """Renew the lease of every slot this instance holds; returns env -> status (renew.lua).

        One script call per ``RENEW_BATCH`` environments (per cluster slot); counts are
        absolute. ``lease_ms=0`` gives everything back (shutdown).
        """
        ms = self.lease_ms if lease_ms is None else lease_ms
        groups: dict[int, list[str]] = {}
        clustered = isinstance(self.calls.store, ClusterStore)  # one script call: one hash slot
        for env in self.held:
            groups.setdefault(self.calls.key_slot(env) if clustered else 0, []).append(env)
        calls: list[_RenewCall] = []
        now = script_arg(self.clock.script_time())
        for key_slot, envs in groups.items():
            for i in range(0, len(envs), RENEW_BATCH):
                batch = envs[i:i + RENEW_BATCH]
                names: list[str] = []
                args: list[str | int] = [self.instance, ms, now]
                for env in batch:
                    names += keys.renew_keys(env)
                    held = self.held[env]
                    args.append(len(held))
                    for slot, n in held.items():
                        args += (slot, n)
                    # What was queued to give back is in these absolute counts already.
                    self.settler.forget_releases(env)
                    self._renewals[env] = self._renewals.get(env, 0) + 1
                fut = self.calls.store.submit(self.calls.command(RENEW, names, args), key_slot)
                calls.append(_RenewCall(batch, fut, names, args, key_slot))
                self.renew_commands += 1
                metrics.LEASE_RENEW_CALLS.inc()
        self.renewals += 1
        statuses: dict[str, int] = {}
        errors: list[StoreError] = []
        for call in calls:
            try:
                try:
                    reply = await call.fut
                except NoScript as exc:
                    reply = await self.calls.reload(RENEW, call.names, call.key_slot,
                                                    call.args, exc)
            except StoreError as exc:
                count_store_error(exc)
                errors.append(exc)
                continue
            statuses.update(zip(call.envs, reply, strict=True))
            for env in call.envs:  # zeros written: forget them (unless taken again since)
                kept = self.held.get(env)
                if kept is not None:
                    for slot in [s for s, n in kept.items() if n == 0]:
                        del kept[slot]
                    if not kept:
                        del self.held[env]
        metrics.LEASE_RENEWALS.labels("failed" if errors else "ok").inc()
        if errors:
            raise errors[0]
        if self.on_ended is not None:
            for env, status in statuses.items():
                if status in ENDED:
                    self.on_ended(env, ENDED[status])
        return statuses

    def start_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    async def _renew_loop(self) -> None:
        while True:
            await pause(self.renew_interval)
            if not self.held:
                continue
            try:
                await self.renew()
            except StoreError as exc:
                stop_if_cancelling(exc)
                log.warning("lease renewal failed (%s); slots of %d environments held here, "
                            "renewed when the store answers", exc, len(self.held))

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer

    async def give_back(self) -> None:
        """Hand every held slot back (a clean shutdown); else they expire with the lease."""
        if self.held:
            try:
                await self.renew(lease_ms=0)
            except StoreError as exc:
                log.warning("could not give slots back (%s): they expire with the lease", exc)
