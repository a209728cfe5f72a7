"""Writing the fail-open backlog back once the store answers again: each entry at its slot's
start (its day and cycle decide plan, packs or pay-as-you-go), in ``record`` mode (no QPS,
never refused), once per record id whatever the retries — and what stopped gateways left in
their journals.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from pathlib import Path

from quotagate.common.aio import pause, stop_if_cancelling
from quotagate.limiter import keys
from quotagate.limiter.backlog import MAX_MISSING_ATTEMPTS, METER_PREFIX, Backlog
from quotagate.limiter.calls import ScriptCalls
from quotagate.limiter.decision import Decider
from quotagate.limiter.errors import StoreError, StoreUnavailable
from quotagate.limiter.hot import recover as recover_leases
from quotagate.limiter.journal import Journal, Key
from quotagate.limiter.journal import recover as recover_journals
from quotagate.limiter.scripts import DECIDE

log = logging.getLogger("quotagate.limiter")

#: Journal entries the store refused (journal.recover) are tried again after this, doubling
#: up to LATER_MAX_S.
LATER_S = 60.0
LATER_MAX_S = 3600.0


class WriteBack:
    def __init__(self, calls: ScriptCalls, decider: Decider,
                 on_missing: Callable[[str], None]):
        self.calls = calls
        self.decider = decider
        self.instance = decider.instance
        self.backlog = Backlog()
        self.on_missing = on_missing
        self._drainer: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._write_ids = itertools.count(1)
        self._closing = False

    def start(self) -> None:
        """Write back in the background until the backlog is empty (retrying, backing off)."""
        if self._closing:  # stopping: what is pending stays in the journal
            return
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain_loop())

    async def _drain_loop(self) -> None:
        store = self.calls.store
        delay = store.retry_interval
        while self.backlog.pending or self.backlog.in_doubt:
            await pause(delay)
            try:
                await self.flush()
            except StoreError as exc:
                stop_if_cancelling(exc)
                log.warning("write-back not done (%s); %d usage entries held for it",
                            exc, len(self.backlog))
            delay = (min(delay * 2, 5.0) if self.backlog.pending or self.backlog.in_doubt
                     else store.retry_interval)

    async def flush(self) -> int:
        """Write back what passed while the store was down; returns the entries written.

        Each entry is recorded at its slot's start time (its day and cycle), through the same
        script in ``record`` mode (no QPS, never refused). One flush at a time.
        """
        async with self._flush_lock:
            written = 0
            backlog = self.backlog
            #: Entries the store answered with an error (their keys, not the store, at
            #: fault): left in doubt, sent again under their ids next time, while the rest go.
            refused: list[tuple[Key, StoreError]] = []
            for key in list({**backlog.pending, **backlog.in_doubt}):
                env, what, slot_ms = key
                # Under an id the store remembers: a write-back that timed out (it may have
                # run) is sent again as it was, same id, same amount, until it is answered;
                # and one the journal replays after a crash is not counted twice.
                doubt = backlog.in_doubt.get(key)
                if doubt is None:
                    cost = backlog.pending.get(key, 0)
                    if cost <= 0:
                        continue
                    doubt = backlog.in_doubt[key] = (f"{self.instance}.{next(self._write_ids)}",
                                                     cost)
                    backlog.note_intent(key, *doubt)
                record_id, cost = doubt
                try:
                    found = await self.write_back(env, what, cost, slot_ms, record_id)
                except StoreUnavailable:
                    raise  # the store is away: every entry waits for it alike
                except StoreError as exc:
                    stop_if_cancelling(exc)
                    refused.append((key, exc))
                    continue
                del backlog.in_doubt[key]
                if not found:
                    attempts = backlog.missing_attempts.get(key, 0) + 1
                    backlog.missing_attempts[key] = attempts
                    if attempts >= MAX_MISSING_ATTEMPTS:
                        log.error("usage of %s (%d %s) lost: the store has no such environment",
                                  env, cost, what)
                        backlog.dropped += cost
                        backlog.remove(key, backlog.pending.get(key, 0), done=record_id)
                    else:
                        backlog.note_done(key, record_id)
                    continue
                # Only what was written leaves the backlog; more may have been added meanwhile.
                backlog.remove(key, cost, done=record_id)
                written += 1
            self.backlog.written += written
            if written:
                log.info("wrote back %d usage entries admitted while the store was down",
                         written)
            if refused:
                (env, what, _), first = refused[0]
                raise StoreError(f"{len(refused)} usage entries refused by the store, kept "
                                 f"for another attempt (the first: {env} {what}: {first})")
            return written

    async def write_back(self, env: str, what: str, amount: int, at_ms: int,
                         record_id: str) -> bool:
        """Record usage that passed at ``at_ms`` while the store was away (``what``: a route
        kind, through decide.lua; ``meter:<name>``, through settle.lua), once per
        ``record_id`` whatever the retries. False if the store has no such environment."""
        seen = keys.seen(env, "j:" + record_id)
        if what.startswith(METER_PREFIX):
            reply = await self.calls.settle(env, [*keys.settle_keys(env), seen], [
                at_ms, self.instance, "record", 0, what[len(METER_PREFIX):], amount])
        else:
            reply = await self.calls.run(DECIDE, env, [*keys.decision_keys(env), seen], [
                at_ms, what, amount, "record", self.decider.burst_ms, "", self.instance,
                self.decider.lease_ms, ""])
        if reply[0] == 4:  # no snapshot: the store lost its data? (the gateway re-syncs)
            self.on_missing(env)
            return False
        return True

    async def recover_leases(self, path: Path, instance: str) -> int:
        """A stopped gateway's lease journal (hot.py), told to the store."""
        return await recover_leases(self.calls, path, instance)

    def open_journal(self, directory: Path) -> None:
        """Keep the backlog in a journal in ``directory`` too (journal.py)."""
        self.backlog.journal = Journal(directory, self.instance).open()

    async def recover_journals(self, directory: Path) -> int:
        """Write back what gateways that stopped during an outage left in their journals;
        returns the entries written. Entries the store answered with an error (each tried a
        few times) stay in their journals and are tried again later, LATER_S and then less
        and less often (and at the next start); the store being away raises (StoreError)."""
        written = 0
        delay = LATER_S
        while True:
            done = await recover_journals(directory, self.instance, self.write_back,
                                          leases=self.recover_leases)
            written += done.written
            if not done.kept:
                return written
            log.warning("%d usage entries of stopped gateways' journals could not be written "
                        "back: tried again in %.0f s", done.kept, delay)
            await pause(delay)
            delay = min(delay * 2, LATER_MAX_S)

    async def stop(self) -> None:
        """No new write-back from here on; the one running is cancelled."""
        self._closing = True
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer

    def close(self) -> None:
        """After the store is closed: what is still pending stays in the journal's file (the
        next start writes it back)."""
        if self._drainer is not None:
            self._drainer.cancel()
        journal = self.backlog.journal
        if journal is not None:
            journal.close(remove=not self.backlog.pending and not self.backlog.in_doubt)
            self.backlog.journal = None
