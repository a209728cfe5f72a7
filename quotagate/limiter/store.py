"""Auto-pipelined store connection for the hot path.

Every request still makes exactly one EVALSHA, but the calls of requests that arrive in the
same event-loop iteration leave in one write, and their replies come back in one read: many
concurrent decisions share a round trip (as ioredis' auto-pipelining does). redis-py has no
such mode and its per-command overhead would cost a third of the gateway's throughput, so the
hot path speaks RESP itself on one connection and parses with hiredis; everything else (config
sync, admin, tests) uses redis-py.

Failure handling:
- every command has a deadline (``timeout_ms``); a watchdog checks the oldest reply every
  ``timeout_ms / 4``, so a hung server (SIGSTOP, network black hole) costs each request at most
  about 1.25 x ``timeout_ms``. Only time the loop could wait counts, never the gateway's own
  stall (a reload parsing a big file on the loop, a GC pause, a slow disk): a command's time
  starts when it is written, not when it is queued; the watchdog measures how late it fires
  and every such stall is taken off the time of the commands it caught (``loop_stalls``);
  and a deadline found missed is acted on only after the loop has read its sockets once
  more, so a reply that came in during a stall is never taken for a timeout. A hung store is
  still found: the loop's own lateness is all that is discounted, each watchdog tick still
  counts in full. The stalled connection is then set aside, not closed: if the
  server comes back, the late replies still arrive there and ``when_late`` callbacks learn
  which timed-out commands did run (the limiter uses this so fail-open write-back does not
  count them twice). Closing it instead would let a resumed server run commands whose outcome
  nobody reads. At most ``MAX_STALLED`` such connections are kept;
- a failed or refused connection makes calls fail at once for ``retry_interval_ms``, then the
  next call reconnects;
- error replies are translated here, once: ``NOSCRIPT`` -> ``NoScript``; a store that cannot
  serve now (LOADING, BUSY, OOM, READONLY, MASTERDOWN, TRYAGAIN, CLUSTERDOWN, MISCONF) ->
  ``StoreUnavailable``, so the failure policy applies; anything else -> ``StoreError``;
- ``setup`` commands (the limiter's ``SCRIPT LOAD`` and ``FUNCTION LOAD``) run on every new
  connection, so a restarted store has the scripts before the first request needs them; an
  ``OptionalSetup`` one may fail (``FUNCTION LOAD`` where functions are refused) without
  failing the connection.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

import hiredis

from quotagate.common import metrics
from quotagate.common.addresses import StoreAddress
from quotagate.limiter.errors import (
    NoFunctions,
    NoScript,
    OutOfMemory,
    Redirected,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
)

_NOT_ENOUGH = object()

#: Stalled connections kept open to learn the fate of timed-out commands.
MAX_STALLED = 8

#: The longest stall of the gateway's own loop taken off one command's time (a loop that
#: stops for longer than this is an outage of its own; the replies it did get still count).
MAX_STALL_CREDIT_S = 60.0
#: Loop lateness below this is timer granularity, not a stall (nothing is recorded).
STALL_NOISE_S = 0.002
#: Stalls remembered (the ones that overlap a command in flight are needed; older ones go).
MAX_STALLS = 1024

#: Error replies that mean "the store cannot serve right now", not "the command is wrong".
_UNAVAILABLE = ("LOADING", "BUSY", "OOM", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN",
                "MISCONF", "NOREPLICAS")

LateCallback = Callable[[Any], None]


class OptionalSetup(bytes):
    """A setup command whose failure does not fail the connection."""


def translate(error: hiredis.ReplyError) -> StoreError:
    text = str(error)
    if text.startswith("NOSCRIPT") or text.startswith("ERR Function not found"):
        return NoScript(text)
    if (text.startswith("ERR unknown command") or text.startswith("NOPERM")) and (
            "fcall" in text.lower() or "function" in text.lower()):
        return NoFunctions(text)
    if text.startswith(("MOVED ", "ASK ")):
        return Redirected(text)
    if text.startswith("OOM"):
        return OutOfMemory(f"store cannot serve: {text}")
    if text.startswith(_UNAVAILABLE):
        return StoreUnavailable(f"store cannot serve: {text}")
    return StoreError(f"store error: {text}")


def pack_command(*args: bytes | str | int) -> bytes:
    """A RESP array of bulk strings: hiredis's encoder (in C; byte for byte what ours was, at
    about 0.6x the time). Only decide.lua's call is packed by hand (decision.py): its keys are
    cached per environment, which no general encoder can do."""
    return hiredis.pack_command(args)  # type: ignore[arg-type]  # (its stub says a 1-tuple)


async def _patiently(awaitable: Any, seconds: float) -> Any:
    """Await ``awaitable`` for ``seconds`` of time the loop could wait: what it was late by
    (a stall of the gateway's own) does not count, and before giving up the loop reads its
    sockets once more. Then it is cancelled and TimeoutError raised."""
    fut = asyncio.ensure_future(awaitable)
    left = seconds
    step = max(seconds / 4, 0.005)
    try:
        while True:
            wait = min(step, left)
            started = time.monotonic()
            await asyncio.wait((fut,), timeout=wait)
            if fut.done():
                return fut.result()
            left -= min(time.monotonic() - started, wait)  # the lateness is the loop's
            if left <= 0:
                await asyncio.sleep(0)  # what came in meanwhile is read first
                await asyncio.sleep(0)
                if fut.done():
                    return fut.result()
                raise TimeoutError
    finally:
        if not fut.done():
            fut.cancel()


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: PipelinedStore):
        self._owner = owner
        self._reader = hiredis.Reader(notEnoughData=_NOT_ENOUGH)
        self.transport: asyncio.Transport | None = None
        #: (future, write time) per command in flight, in send order. The write time is a
        #: one-item list shared by the commands of one write; 0.0 until it is written.
        self.waiting: collections.deque[tuple[asyncio.Future[Any], list[float]]] = (
            collections.deque())
        self._out: list[bytes] = []
        self._batch: list[float] = [0.0]
        self._flush_scheduled = False
        self.closed = False
        self.stalled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses

    def send(self, data: bytes, fut: asyncio.Future[Any]) -> None:
        if self.closed or self.stalled:
            fut.set_exception(StoreUnavailable("store connection closed"))
            return
        self.waiting.append((fut, self._batch))
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.closed:
            data = b"".join(self._out)
            self._out.clear()
            self.transport.write(data)
            self._batch[0] = time.monotonic()  # their time starts now, not when queued
            self._batch = [0.0]
            self._owner.writes += 1

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self.waiting
        while True:
            reply = reader.gets()
            if reply is _NOT_ENOUGH:
                break
            if not waiting:  # a reply nobody asked for: the stream is out of step
                self.abort(StoreError("unexpected reply from store"))
                return
            fut, _ = waiting.popleft()
            if fut.done():  # timed out earlier: someone may want to know it ran after all
                self._owner._late_reply(fut, reply)
            elif isinstance(reply, hiredis.ReplyError):
                fut.set_exception(translate(reply))
            else:
                fut.set_result(reply)
        if self.stalled and not waiting and self.transport is not None:
            self.transport.close()  # every late reply is in: the stalled connection is done

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail_all(StoreUnavailable(f"store connection lost: {exc or 'closed by server'}"))

    def fail_all(self, exc: Exception) -> None:
        self.closed = True
        self._out.clear()
        while self.waiting:
            fut, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)
            else:
                self._owner._late_reply(fut, None)  # never answered: it did not run
        self._owner._forget(self)

    def stall(self, exc: Exception) -> None:
        """Fail every waiting request now, but keep reading: late replies still count."""
        self.stalled = True
        self._out.clear()
        for fut, _ in self.waiting:
            if not fut.done():
                fut.set_exception(exc)
                self._owner._expect_late(fut)

    def abort(self, exc: Exception) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.fail_all(exc)


class PipelinedStore:
    """One auto-pipelined connection with deadlines, fast failure and reconnection."""

    def __init__(
        self,
        address: StoreAddress,
        timeout_ms: int = 200,
        connect_timeout_ms: int = 500,
        retry_interval_ms: int = 250,
        setup: tuple[bytes, ...] = (),
    ):
        self.address = address
        self.timeout = timeout_ms / 1000
        self.connect_timeout = connect_timeout_ms / 1000
        self.retry_interval = retry_interval_ms / 1000
        self.setup = setup
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._down_until = 0.0
        self._last_error = ""
        self._watchdog: asyncio.Handle | None = None
        #: When the watchdog's callback is due (to measure how late the loop runs it).
        self._watchdog_due = 0.0
        #: The loop's own stalls as (start, end) in monotonic time, oldest first: time no
        #: command can have been waiting for the store (see ``_store_time``).
        self._loop_stalls: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=MAX_STALLS)
        #: Seconds the loop was found stalled (late watchdog ticks), and deadlines the
        #: watchdog would have failed but for that (a reply read after the stall instead).
        self.loop_stalled_s = 0.0
        self.timeouts_spared = 0
        self._stalled: collections.deque[_Protocol] = collections.deque()
        #: Timed-out futures -> the callback waiting for their late reply (None: not yet set).
        self._late: dict[asyncio.Future[Any], LateCallback | None] = {}
        #: Late replies that arrived before their callback was registered.
        self._early: dict[asyncio.Future[Any], Any] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.connects = 0
        #: Socket writes: every command queued in one loop iteration goes out in one.
        self.writes = 0
        #: Optional setup commands the store refused.
        self.optional_failures = 0

    @property
    def last_error(self) -> str:
        return self._last_error

    async def execute(self, *args: bytes | str | int) -> Any:
        return await self.execute_packed(pack_command(*args))

    async def execute_packed(self, packed: bytes) -> Any:
        return await self.submit(packed)

    async def execute_all(self, *args: bytes | str | int) -> list[Any]:
        """The command on every node: here, the one."""
        return [await self.execute(*args)]

    def submit(self, packed: bytes, slot: int | None = None) -> asyncio.Future[Any]:
        """Queue one packed command; the future gets its reply or a StoreError. (``slot`` is
        for the cluster store's routing; one node serves them all here.)"""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        proto = self._proto
        if proto is not None and not proto.closed and not proto.stalled:
            proto.send(packed, fut)
        else:
            task = loop.create_task(self._send_when_connected(packed, fut))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return fut

    def node_of(self, slot: int) -> object:
        """Which node serves ``slot`` (the cluster store's question): here, the one."""
        return self.address

    async def _send_when_connected(self, packed: bytes, fut: asyncio.Future[Any]) -> None:
        try:
            proto = await self._connect()
        except StoreError as exc:
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():  # also fails at once if the connection closed meanwhile
            proto.send(packed, fut)

    def when_late(self, fut: asyncio.Future[Any], callback: LateCallback) -> None:
        """Call ``callback(reply)`` if the timed-out ``fut``'s command is answered after all,
        or ``callback(None)`` once it is known it never will be."""
        if fut in self._early:
            callback(self._early.pop(fut))
        elif fut in self._late:
            self._late[fut] = callback
        else:  # never sent (no connection in time), or its connection is gone: never ran
            callback(None)

    def _expect_late(self, fut: asyncio.Future[Any]) -> None:
        self._late[fut] = None

    def _late_reply(self, fut: asyncio.Future[Any], reply: Any) -> None:
        if fut not in self._late:
            return
        callback = self._late.pop(fut)
        if callback is not None:
            callback(reply)
        elif reply is not None:
            self._early[fut] = reply
            if len(self._early) > 100_000:  # nobody registered: do not hold them forever
                self._early.clear()

    async def _connect(self) -> _Protocol:
        now = time.monotonic()
        if now < self._down_until:
            raise StoreUnavailable(f"store unavailable: {self._last_error}")
        if self._connecting is None:
            loop = asyncio.get_running_loop()
            self._connecting = loop.create_future()
            task = loop.create_task(self._open())
            task.add_done_callback(self._connected)
        try:
            return await _patiently(asyncio.shield(self._connecting), self.timeout)
        except TimeoutError:
            raise StoreTimeout("store connection did not complete in time") from None

    def _connected(self, task: asyncio.Task[_Protocol]) -> None:
        waiter, self._connecting = self._connecting, None
        assert waiter is not None
        exc = task.exception()
        if exc is not None:
            self._last_error = str(exc) or type(exc).__name__
            self._down_until = time.monotonic() + self.retry_interval
            err = exc if isinstance(exc, StoreError) else StoreUnavailable(self._last_error)
            waiter.set_exception(err)
            waiter.exception()  # mark retrieved: nobody may be waiting
            return
        self._proto = task.result()
        self.connects += 1
        waiter.set_result(self._proto)
        self._arm_watchdog()

    async def _open(self) -> _Protocol:
        made: list[_Protocol] = []
        try:
            return await _patiently(self._open_steps(made), self.connect_timeout)
        except BaseException as exc:
            # A connection that was made but not set up (a hung store accepts TCP and never
            # answers) is closed here, or every attempt during a hang would keep its socket.
            for proto in made:
                if proto.transport is not None:
                    proto.transport.abort()
            if isinstance(exc, TimeoutError):
                raise StoreTimeout("store connection timed out") from None
            if isinstance(exc, OSError):
                raise StoreUnavailable(
                    f"cannot connect to store: {exc.strerror or exc}") from None
            if isinstance(exc, StoreError):
                raise StoreUnavailable(f"store refused the connection setup: {exc}") from None
            raise

    async def _open_steps(self, made: list[_Protocol]) -> _Protocol:
        loop = asyncio.get_running_loop()
        addr = self.address
        proto: _Protocol
        if addr.unix_path:
            _, proto = await loop.create_unix_connection(lambda: _Protocol(self), addr.unix_path)
        else:
            ctx = addr.ssl_context()
            _, proto = await loop.create_connection(
                lambda: _Protocol(self), addr.host, addr.port, ssl=ctx
            )
        made.append(proto)
        setup = []
        if addr.password:
            auth = ["AUTH", addr.username, addr.password] if addr.username else [
                "AUTH", addr.password]
            setup.append(pack_command(*auth))
        if addr.db:
            setup.append(pack_command("SELECT", addr.db))
        setup.append(pack_command("CLIENT", "SETNAME", "quotagate-hot"))
        setup.extend(self.setup)
        futs = []
        for cmd in setup:
            fut: asyncio.Future[Any] = loop.create_future()
            proto.send(cmd, fut)
            futs.append(fut)
        for cmd, fut in zip(setup, futs, strict=True):
            try:
                await fut
            except StoreError:
                # An optional one may fail for any reason (refused, OOM, already there); a
                # store that cannot serve fails the required ones too.
                if not isinstance(cmd, OptionalSetup):
                    raise
                self.optional_failures += 1
        return proto

    def _arm_watchdog(self) -> None:
        if self._watchdog is None:
            tick = max(self.timeout / 4, 0.005)
            self._watchdog_due = time.monotonic() + tick
            self._watchdog = asyncio.get_running_loop().call_later(tick, self._check_deadlines)

    def _note_lateness(self) -> float:
        """How late the loop ran the watchdog: that much of the time since it was armed, the
        loop could not read a reply (it was busy elsewhere), so it is not the store's."""
        now = time.monotonic()
        late = now - self._watchdog_due
        if late > STALL_NOISE_S:
            self._loop_stalls.append((self._watchdog_due, now))
            self.loop_stalled_s += late
            metrics.LOOP_STALL_SECONDS.inc(late)
        return now

    def _store_time(self, written: float, now: float) -> float:
        """How long the loop could wait for a reply written at ``written``: the time since,
        less the loop's own stalls in it (at most ``MAX_STALL_CREDIT_S`` of them)."""
        stalls = self._loop_stalls
        while stalls and stalls[0][1] <= written:  # over before it was written: of no use
            stalls.popleft()
        stalled = 0.0
        for start, end in stalls:
            stalled += end - max(start, written)
        return now - written - min(stalled, MAX_STALL_CREDIT_S)

    def _overdue(self, proto: _Protocol, now: float) -> bool:
        if not proto.waiting:
            return False
        written = proto.waiting[0][1][0]  # the oldest: the longest wait of all
        return written > 0.0 and self._store_time(written, now) > self.timeout

    def _check_deadlines(self) -> None:
        self._watchdog = None
        now = self._note_lateness()
        proto = self._proto
        if proto is None:
            return
        if not proto.waiting:  # nothing in flight: no stall so far can matter to a command
            self._loop_stalls.clear()
        elif self._overdue(proto, now):
            # Missed, it seems; but the reply may be in the socket, unread (the loop runs
            # timers before it reads, and after a stall it has a backlog to read). Let the
            # loop read once more (two turns: a callback a timer schedules may run before
            # the next read), then decide.
            self._watchdog_due = now
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_soon(self._confirm_soon, proto)
            return
        self._arm_watchdog()

    def _confirm_soon(self, proto: _Protocol) -> None:
        self._watchdog = asyncio.get_running_loop().call_soon(self._confirm, proto)

    def _confirm(self, proto: _Protocol) -> None:
        self._watchdog = None
        now = self._note_lateness()
        if self._proto is not proto:
            return
        if not self._overdue(proto, now):
            self.timeouts_spared += 1  # answered after all (or the loop was what stalled)
            self._arm_watchdog()
            return
        self._last_error = "store did not answer in time"
        self._down_until = now + self.retry_interval
        self._proto = None
        proto.stall(StoreTimeout(f"store did not answer within {self.timeout * 1000:.0f} ms"))
        self._stalled.append(proto)
        while len(self._stalled) > MAX_STALLED:
            oldest = self._stalled.popleft()
            oldest.abort(StoreTimeout("too many stalled store connections"))

    def _forget(self, proto: _Protocol) -> None:
        if self._proto is proto:
            self._proto = None
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
        if proto in self._stalled:
            self._stalled.remove(proto)

    async def close(self) -> None:
        for proto in [*([self._proto] if self._proto else []), *self._stalled]:
            if proto.transport is not None:
                proto.transport.close()
            proto.fail_all(StoreUnavailable("store connection closed"))
