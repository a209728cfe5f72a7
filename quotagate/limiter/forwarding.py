"""Events the scripts wrote (a quota used up, a pack spent...) moved from the environment's
own stream to the global one: a script can write only its environment's hash slot, so the
move is the limiter's, right after a reply says there are events (``Flag.EVENTS``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from quotagate.common import metrics
from quotagate.common.clock import Clock
from quotagate.limiter import due, keys
from quotagate.limiter.calls import ScriptCalls
from quotagate.limiter.cluster import slot_of
from quotagate.limiter.errors import StoreError
from quotagate.limiter.store import pack_command

log = logging.getLogger("quotagate.limiter")

#: Take the move's lock, or keep it if it is ours already: a move of ours that failed (its
#: reply lost to a timeout) could not release it, and its retry must not wait it out.
_TAKE_LOCK = ("if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) "
              "or redis.call('GET', KEYS[1]) == ARGV[1] then "
              "redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end return 0")
_DEL_IF_MINE = ("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) "
                "end return 0")
#: Append one event to the global stream unless it was appended before (KEYS[2], set in the
#: same script once the append went through — an append the store refuses marks nothing): a
#: move whose reply was lost (a timeout), or that stopped before the events were deleted from
#: their environment's stream (a crash), is made again without a copy.
_MOVE_ONCE = ("if redis.call('EXISTS', KEYS[2]) == 1 then return false end "
              "local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', "
              "unpack(ARGV, 3)) "
              "redis.call('SET', KEYS[2], '1', 'EX', ARGV[1]) return id")
#: How long a moved event is remembered: far longer than any retry, or an instance's death
#: before the scheduler's next round moves what it left.
MOVED_TTL_S = 86_400


#: A move the store refused or let time out is tried again after these pauses (seconds); after
#: the last, the events wait for the scheduler's next round (the environment is due: ``due``).
#: An event must not wait a round out for one slow store call (a busy machine, a failover).
RETRY_PAUSES_S = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)


class EventForwarder:
    def __init__(self, calls: ScriptCalls, instance: str, clock: Clock):
        self.calls = calls
        self.store = calls.store
        self.instance = instance
        self.clock = clock
        self._forwarding: set[str] = set()
        self._forward_again: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: This instance's lock token per environment, kept until the lock is released: a
        #: retry after a failed move holds the lock the failed one left (``_TAKE_LOCK``).
        self._tokens: dict[str, str] = {}
        #: Set at shutdown: moves under way finish, no more retries wait.
        self._closing = asyncio.Event()

    def soon(self, env: str) -> None:
        """Forward ``env``'s events in the background (one pass at a time per env)."""
        if env in self._forwarding:  # running: it makes one more pass for these
            self._forward_again.add(env)
            return
        self._forwarding.add(env)
        task = asyncio.get_running_loop().create_task(self._forward_task(env))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mark_due(self, env: str) -> None:
        """The environment is due (``due``): should this instance die before the events are
        moved, or give up on moving them, the scheduler's next round moves them."""
        shard = keys.due(due.shard_of(env))
        with contextlib.suppress(StoreError):  # (then only this instance's retries)
            await self.store.submit(pack_command(
                "EVAL", due.MARK, 1, shard, repr(due.changed_score(self.clock.now_ms())), "",
                env), slot_of(shard))

    async def _forward_task(self, env: str) -> None:
        retries = iter(RETRY_PAUSES_S)
        try:
            await self._mark_due(env)
            while True:
                self._forward_again.discard(env)
                try:
                    await self.forward(env)
                except StoreError as exc:
                    delay = next(retries, None)
                    if delay is None or self._closing.is_set():
                        log.warning("events of %s stay in its stream until the "
                                    "scheduler's next round (%s)", env, exc)
                        return
                    log.info("events of %s not moved yet (%s): again in %.1f s", env, exc,
                             delay)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):  # (a shutdown ends the wait)
                            await self._closing.wait()
                    if self._closing.is_set():
                        log.warning("events of %s stay in its stream until a scheduler round (%s)",
                                    env, exc)
                        return
                    self._forward_again.add(env)
                if env not in self._forward_again:
                    return
        finally:
            self._forwarding.discard(env)
            self._forward_again.discard(env)

    async def forward(self, env: str) -> int:
        """Move the events the scripts wrote to the environment's stream onto the global
        stream. One instance at a time per environment (a short lock); each event is
        appended once (``_MOVE_ONCE``), however often a move is tried again after a lost
        reply or a crash between the append and the delete. ``event_id``
        (``<env>/<stream id>``) names it for consumers."""
        source, lock = keys.env_events(env), keys.forward_lock(env)
        key_slot, events_slot = self.calls.key_slot(env), slot_of(keys.EVENTS)
        token = self._tokens.setdefault(env, f"{self.instance}:{secrets.token_hex(4)}")
        for _ in range(10):
            got = await self.store.submit(
                pack_command("EVAL", _TAKE_LOCK, 1, lock, token, 30_000), key_slot)
            if got == 1:
                break
            await asyncio.sleep(0.2)  # another instance is moving them; look again after
        else:  # (tried again later, like a store error: its move may fail too)
            raise StoreError(f"the events of {env} are being moved by another instance")
        moved = 0
        try:
            while True:
                entries = await self.store.submit(
                    pack_command("XRANGE", source, "-", "+", "COUNT", 100), key_slot)
                if not entries:
                    return moved
                for entry_id, fields in entries:
                    event_id = f"{env}/{entry_id.decode()}"
                    await self.store.submit(pack_command(
                        "EVAL", _MOVE_ONCE, 2, keys.EVENTS, keys.moved(event_id),
                        MOVED_TTL_S, 1_000_000, "event_id", event_id, "env", env, *fields),
                        events_slot)
                await self.store.submit(pack_command("XDEL", source, *(e[0] for e in entries)),
                                        key_slot)
                moved += len(entries)
                metrics.EVENTS_FORWARDED.inc(len(entries))
        finally:  # only our own lock (one that expired may be another instance's now)
            await self.store.submit(pack_command("EVAL", _DEL_IF_MINE, 1, lock, token),
                                    key_slot)
            self._tokens.pop(env, None)  # released (if the release failed, it stays ours)

    async def finish(self) -> None:
        """Wait for the moves under way (at shutdown); none waits to be tried again."""
        self._closing.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
