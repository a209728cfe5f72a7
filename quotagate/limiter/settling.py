"""What is settled after a response: slots given back, metered usage charged, charges
refunded — batched, so everything that finished in one event-loop iteration leaves as one
settle.lua call per environment, and the calls of several environments served by one store node
as one settle_many call (lua/settle_many.lua): the store sees about one call per node and loop
iteration, however the requests spread over environments.

Usage the store cannot take is kept in the fail-open backlog (written back later); a refund it
cannot take is sent again, under one id the store remembers, until it is taken or given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
from collections.abc import Callable

from quotagate.common.aio import pause, stop_if_cancelling
from quotagate.common.clock import Clock, script_arg
from quotagate.limiter import keys
from quotagate.limiter.backlog import METER_PREFIX, SLOT_MS
from quotagate.limiter.calls import SETTLE_REFUSED, ScriptCalls, log_refused_settle
from quotagate.limiter.codes import Flag
from quotagate.limiter.errors import (
    NoScript,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
    count_store_error,
)
from quotagate.limiter.scripts import SETTLE, SETTLE_MANY
from quotagate.limiter.store import pack_command
from quotagate.limiter.writeback import WriteBack

log = logging.getLogger("quotagate.limiter")

#: settle.lua reads a meter named "-<meter>@<ms>" as a refund of it.
REFUND_PREFIX = "-"
#: A refund the store did not take is sent again this often, at most this many times.
REFUND_RETRY_S = 1.0
REFUND_ATTEMPTS = 120


#: Environments' settles in one settle_many call at most (its time in the store grows with
#: them, and other commands wait behind it).
MANY_MAX = 64
#: settle_many's reply for a call whose keys its node does not serve, and for one that failed.
MANY_NOT_HERE = 32
MANY_FAILED = 33
#: settle.lua's own reply statuses (ran, no snapshot, seen before, refused).
SETTLE_STATUSES = (0, 4, 8, SETTLE_REFUSED)


@dataclasses.dataclass(frozen=True, slots=True)
class _Call:
    """One environment's settle: settle.lua's KEYS and ARGV, and the meters it charges."""
    env: str
    names: list[str]
    args: list[str | int]
    meters: dict[str, int]


def _never_late(callback: Callable[[object], None]) -> None:
    """(A call that was answered has no late reply.)"""


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class Settler:
    def __init__(self, calls: ScriptCalls, clock: Clock, instance: str, mode: str,
                 writeback: WriteBack, on_events: Callable[[str], None]):
        self.calls = calls
        self.clock = clock
        self.instance = instance
        #: "enforce" or "shadow" (the limiter's, kept in step).
        self.mode = mode
        self.writeback = writeback
        self.on_events = on_events
        #: env -> (slot -> count to give back, meter -> amount to charge), flushed next tick.
        self.pending: dict[str, tuple[dict[str, int], dict[str, int]]] = {}
        self._scheduled = False
        #: Refunds being sent again (cancelled at close).
        self._refund_tasks: set[asyncio.Task[None]] = set()
        self._refund_ids = itertools.count(1)
        self._closing = False

    def queue(self, env: str, slot: str | None, meter: str | None, n: int) -> None:
        """Give back ``n`` of ``slot`` and/or charge ``n`` of ``meter`` (a name, or a refund
        "-<meter>@<ms>"), in the next batch."""
        pending = self.pending.get(env)
        if pending is None:
            pending = self.pending[env] = ({}, {})
        if slot is not None:
            pending[0][slot] = pending[0].get(slot, 0) + n
        if meter is not None:
            pending[1][meter] = pending[1].get(meter, 0) + n
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def refund(self, env: str, meter: str, amount: int, charged_at_ms: int) -> None:
        if amount > 0:
            self.queue(env, None, f"{REFUND_PREFIX}{meter}@{charged_at_ms}", amount)

    def forget_releases(self, env: str) -> None:
        """A renewal's absolute counts hold what was queued to give back already."""
        pending = self.pending.get(env)
        if pending is not None:
            pending[0].clear()

    def flush(self) -> None:
        """Everything finished in one loop iteration: one settle call per environment, and
        those of several environments on one store node batched into one call of
        settle_many (up to ``MANY_MAX`` each) while the store takes functions."""
        self._scheduled = False
        if len(self.pending) < 2 or not self.calls.functions:
            for env in list(self.pending):
                self.flush_env(env)
            return
        store = self.calls.store
        by_node: dict[object, list[str]] = {}
        for env in self.pending:
            node = store.node_of(self.calls.key_slot(env))
            by_node.setdefault(node, []).append(env)
        for node, envs in by_node.items():
            if node is None or len(envs) == 1:  # (None: the slot map is not read yet)
                for env in envs:
                    self.flush_env(env)
                continue
            for i in range(0, len(envs), MANY_MAX):
                chunk = envs[i:i + MANY_MAX]
                if len(chunk) == 1:
                    self.flush_env(chunk[0])
                else:
                    self._send_many([self._call(env) for env in chunk])

    def flush_env(self, env: str) -> None:
        """The environment's queued settle, now, in a call of its own."""
        self._send(self._call(env))

    def _call(self, env: str) -> _Call:
        """The environment's queued settle as settle.lua's KEYS and ARGV (taken off the
        queue)."""
        releases, meters = self.pending.pop(env)
        args: list[str | int] = [script_arg(self.clock.script_time()), self.instance, self.mode,
                                 len(releases)]
        for slot, n in releases.items():
            args += (slot, n)
        for meter, amount in meters.items():
            args += (meter, amount)
        return _Call(env, keys.settle_keys(env), args, meters)

    def _send(self, call: _Call) -> None:
        key_slot = self.calls.key_slot(call.env)
        fut = self.calls.store.submit(self.calls.command(SETTLE, call.names, call.args),
                                      key_slot)
        fut.add_done_callback(lambda f: self._settled(call, key_slot, f))

    def _send_many(self, batch: list[_Call]) -> None:
        """Several environments' settles in one settle_many call to the node serving the
        first one's slot (and, as the slot map last said, all of them)."""
        argv: list[str | int] = [len(batch)]
        for call in batch:
            argv += (len(call.names), *call.names, len(call.args), *call.args)
        fut = self.calls.store.submit(pack_command("FCALL", SETTLE_MANY, 0, *argv),
                                      self.calls.key_slot(batch[0].env))
        fut.add_done_callback(lambda f: self._many_settled(batch, f))

    def _many_settled(self, batch: list[_Call], fut: asyncio.Future) -> None:
        exc = fut.exception() if not fut.cancelled() else StoreUnavailable("cancelled")
        if isinstance(exc, NoScript):
            # Not run (the store lost the library, or has an older one without settle_many):
            # each on its own, which loads the library again (or turns to scripts).
            for call in batch:
                self._send(call)
            return
        if exc is not None:
            if isinstance(exc, StoreError):
                count_store_error(exc)
            late: dict[int, Callable[[object], None]] = {}
            for i, call in enumerate(batch):
                self._outcome(call, None, exc, functools.partial(late.__setitem__, i))
            if late:  # timed out: the late reply, if any, tells each call whether it ran

                def answered(reply: object) -> None:
                    for i, callback in late.items():
                        one = reply[i] if isinstance(reply, list) and i < len(reply) else None
                        callback(one if isinstance(one, list) and one[0] in SETTLE_STATUSES
                                 else None)

                self.calls.store.when_late(fut, answered)
            return
        for call, reply in zip(batch, fut.result(), strict=True):
            if reply[0] == MANY_NOT_HERE:  # its slot moved: nothing of it ran; on its own
                self._send(call)
            elif reply[0] == MANY_FAILED:
                error = StoreError(f"store error: {_text(reply[1])}")
                count_store_error(error)
                self._outcome(call, None, error, _never_late)
            else:
                self._outcome(call, reply, None, _never_late)

    def _settled(self, call: _Call, key_slot: int, fut: asyncio.Future,
                 retried: bool = False) -> None:
        exc = fut.exception() if not fut.cancelled() else StoreUnavailable("cancelled")
        if isinstance(exc, NoScript) and not retried:
            again = self.calls.reload(SETTLE, call.names, key_slot, call.args, exc)
            again.add_done_callback(lambda f: self._settled(call, key_slot, f, True))
            return
        if isinstance(exc, StoreError):
            count_store_error(exc)
        self._outcome(call, None if exc is not None else fut.result(), exc,
                      lambda callback: self.calls.store.when_late(fut, callback))

    def _outcome(self, call: _Call, reply: list | None, exc: BaseException | None,
                 when_late: Callable[[Callable[[object], None]], None]) -> None:
        """What one settle call's reply (or failure) leaves to do: events to read, usage the
        store did not take kept for write-back, refunds sent again. ``when_late`` registers
        a callback for a timed-out call's late reply (None: it never ran)."""
        env, meters = call.env, dict(call.meters)
        no_snapshot = False
        if exc is None:
            assert reply is not None
            if reply[0] == SETTLE_REFUSED:  # refused whole (out of bounds): never again
                log_refused_settle(env, call.args)
                return
            if reply[1] & Flag.EVENTS:
                self.on_events(env)
            if reply[0] != 4 or not meters:
                return
            no_snapshot = True  # (yet): keep the usage for later
            exc = StoreError(f"no snapshot of {env}")
        refunds = {m: meters.pop(m) for m in [m for m in meters if m.startswith(REFUND_PREFIX)]}
        if no_snapshot:
            refunds = {}  # nothing to give back from
        # When it passed, for the write-back (its day decides plan, packs or pay-as-you-go).
        passed = self.clock.now_ms()
        entries = [((env, METER_PREFIX + m, passed - passed % SLOT_MS), a)
                   for m, a in meters.items()]
        backlog = self.writeback.backlog
        for key, amount in entries:
            backlog.add(key, amount)
        if entries:
            log.warning("metered usage of %s kept for write-back: %s", env, exc)
        if isinstance(exc, StoreTimeout):
            # It may still run: its late reply decides (never both the call and a retry).
            def late(reply: object) -> None:
                if isinstance(reply, list) and reply[1] & Flag.EVENTS:
                    self.on_events(env)  # (moved like any other's)
                if isinstance(reply, list) and reply[0] == 0:  # it ran: not twice
                    for key, amount in entries:
                        backlog.remove(key, amount)
                elif refunds:
                    self._retry_refunds(env, refunds)
            when_late(late)
        elif refunds:
            self._retry_refunds(env, refunds)
        if entries:
            self.writeback.start()

    def _retry_refunds(self, env: str, refunds: dict[str, int]) -> None:
        """Refunds the store did not take (it was away, and their first try did not run):
        sent again in a settle call of their own under one id the store remembers, so a
        try that times out and runs late is not given back twice."""
        seen = keys.seen(env, f"r:{self.instance}.{next(self._refund_ids)}")
        pairs = [x for meter_amount in refunds.items() for x in meter_amount]
        self.send_again(env, [*keys.settle_keys(env), seen], lambda: [
            script_arg(self.clock.script_time()), self.instance, self.mode, 0, *pairs],
            f"refunds to {env} ({refunds})")

    def send_again(self, env: str, names: list[str], args: Callable[[], list[str | int]],
                   what: str, *, until_snapshot: bool = False) -> None:
        """A settle call the store did not take, sent again in the background every
        ``REFUND_RETRY_S`` (its KEYS name a seen id, so a first try that ran late is not
        counted twice) until taken — with ``until_snapshot``, until the store also has the
        environment's snapshot — or ``REFUND_ATTEMPTS`` have failed (then logged and
        dropped). Refused once stopping."""
        if self._closing:
            log.warning("%s not sent (stopping)", what)
            return

        async def again() -> None:
            for _ in range(REFUND_ATTEMPTS):
                await pause(REFUND_RETRY_S)
                try:
                    reply = await self.calls.settle(env, names, args())
                except StoreError as exc:
                    stop_if_cancelling(exc)
                    continue
                if not (until_snapshot and reply[0] == 4):
                    return  # (taken, seen before, or refused whole: logged by calls.settle)
            log.error("%s dropped after %d attempts", what, REFUND_ATTEMPTS)

        task = asyncio.get_running_loop().create_task(again())
        self._refund_tasks.add(task)
        task.add_done_callback(self._refund_tasks.discard)

    def stop_retrying(self) -> None:
        """Settle calls that fail from now on are logged as not sent, never sent again
        (stopping)."""
        self._closing = True

    async def stop(self) -> None:
        """No refund retries from here on (those running are cancelled); what is queued is
        sent now."""
        self.stop_retrying()
        for task in list(self._refund_tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.pending:
            self.flush()

    def cancel_retries(self) -> None:
        for task in list(self._refund_tasks):
            task.cancel()
