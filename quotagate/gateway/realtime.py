"""Realtime WebSocket proxying (SPEC §8).

One client WebSocket multiplexes many watches; every frame is JSON ``{watchId, requestId,
msgType, msgData}``. The gateway relays frames both ways and reads only the client's:

- ``LOGIN`` names the environment (``msgData.envId``) when the upgrade did not (host or
  header); an isolated or unknown one ends the socket, another env than the upgrade's is refused;
- ``INIT_WATCH`` (and ``REBUILD_WATCH`` of a watch not held on this socket) takes one leased
  realtime slot in the same script call that checks lifecycle, QPS and calls; refused, it is
  answered here with an ``ERROR`` frame for that ``watchId``/``requestId`` and not forwarded —
  the socket and its other watches stay up;
- ``CLOSE_WATCH``, the socket's close, or any upstream ``ERROR`` for a held watch frees it (the
  SDK drops a watch on a server ERROR without sending CLOSE_WATCH);
- anything else is passed through untouched (``strict: true`` refuses what is not the protocol).

With ``realtime_unit: socket`` each WebSocket holds one slot instead, taken at the upgrade (429
``connections-exceeded`` at the cap), and frames are not read at all.

Close codes as the SDK reads them: the client's own close code is echoed back to it and sent
to the upstream (the SDK closes with 3001 after its last watch); a socket ended because its
environment is isolated or gone closes with 3050 (the SDK stops rather than reconnecting); an
upstream lost without a close frame closes the client with 1011. 1005, 1006 and 1015 are
never sent (RFC 6455 §7.4.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
from aiohttp import WSMsgType, web
from multidict import istr
from yarl import URL

from quotagate.common import metrics
from quotagate.common.envids import ENV_ID
from quotagate.gateway.decisions import decide
from quotagate.gateway.envid import missing_environment
from quotagate.gateway.problems import (
    Problem,
    refusal,
    upstream_timeout,
    upstream_unavailable,
)
from quotagate.gateway.proxy import forward_request_headers
from quotagate.gateway.routing import CompiledRoute
from quotagate.gateway.state import GatewayState
from quotagate.limiter.bandwidth import Pacer, wait_for
from quotagate.limiter.codes import Outcome
from quotagate.limiter.limiter import Decision

log = logging.getLogger("quotagate.realtime")

CLIENT_TYPES = frozenset(
    {"LOGIN", "INIT_WATCH", "REBUILD_WATCH", "CHECK_LAST", "CLOSE_WATCH", "PING"})
MAX_WATCH_ID = 256
SLOT = "rt:"
#: Close code when the gateway ends a socket because its environment is isolated or gone: the
#: platform SDK's "stop, do not reconnect" code.
ENV_ENDED_CLOSE = 3050


def wire_close_code(code: int | None, *, lost: int) -> int:
    """A close code that may be sent (RFC 6455 §7.4.1 keeps 1005, 1006 and 1015 off the
    wire): ``lost`` for a peer that went away without a close frame (1006, 1015, none), 1000
    for a close frame without a code (1005)."""
    if code is None or code in (1006, 1015):
        return lost
    if code in (0, 1005):  # aiohttp reports a close frame without a code as 0
        return 1000
    return code

#: ERROR frame codes for refused decisions.
ERROR_CODES = {
    Outcome.CONCURRENCY_EXCEEDED: "REALTIME_CONNECTION_LIMIT_EXCEEDED",
    Outcome.QPS_EXCEEDED: "QPS_LIMIT_EXCEEDED",
    Outcome.QUOTA_EXCEEDED: "QUOTA_EXCEEDED",
    Outcome.ISOLATED: "ENVIRONMENT_ISOLATED",
    Outcome.NOT_STARTED: "ENVIRONMENT_ISOLATED",
    Outcome.NOT_FOUND: "ENVIRONMENT_NOT_FOUND",
}
_ENDS_SOCKET = {Outcome.ISOLATED, Outcome.NOT_STARTED, Outcome.NOT_FOUND}
_ENDED_CODES = {"isolated": "ENVIRONMENT_ISOLATED", "not-started": "ENVIRONMENT_ISOLATED",
                "not-found": "ENVIRONMENT_NOT_FOUND"}
_ENDED_WHY = {"ENVIRONMENT_ISOLATED": "is isolated (its plan expired or has not started): "
                                      "renew it to watch again",
              "ENVIRONMENT_NOT_FOUND": "is unknown or released"}

#: Handshake fields aiohttp sets itself for the upstream hop.
_HANDSHAKE = frozenset(istr(h) for h in (
    "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol", "Sec-WebSocket-Accept"))

#: Seconds between WebSocket pings on both sides: a half-open socket (a phone that changed
#: networks) is dropped, and its watches freed, within 1.5 x this.
HEARTBEAT_S = 30.0

_decoder = msgspec.json.Decoder()
_UNREADABLE = object()


def _decode(data: str) -> Any:
    """JSON as the upstream would read it: msgspec first (fast); what it refuses but other
    parsers accept (lone surrogates, 1e400, NaN) through the stdlib's lenient parser;
    ``_UNREADABLE`` if neither can (not JSON, or nested too deep to inspect)."""
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):
        pass
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return _UNREADABLE


def _frame(data: str) -> dict[str, Any] | object | None:
    """The frame as a protocol message; None if it is not one; ``_UNREADABLE`` if it cannot
    be read at all."""
    frame = _decode(data)
    if frame is _UNREADABLE:
        return _UNREADABLE
    if isinstance(frame, dict) and frame.get("msgType") in CLIENT_TYPES:
        return frame
    return None


def _watch_id(frame: dict[str, Any]) -> str | None:
    wid = frame.get("watchId")
    return wid if isinstance(wid, str) and 0 < len(wid) <= MAX_WATCH_ID else None


def _msg_env(frame: dict[str, Any]) -> Any:
    data = frame.get("msgData")
    return data.get("envId") if isinstance(data, dict) else None


class RealtimeSocket:
    """One client WebSocket and its upstream twin: relays frames, holds its watches' slots."""

    def __init__(self, state: GatewayState, route: CompiledRoute, env: str | None,
                 client: web.WebSocketResponse,
                 upstream: aiohttp.ClientWebSocketResponse | None,
                 connect: Callable[[str], Awaitable[aiohttp.ClientWebSocketResponse]]
                 | None = None):
        self.state = state
        self.route = route
        self.client = client
        #: None until an environment is named and admitted (LOGIN): nothing reaches the
        #: upstream before, and a socket that never names one never opens one there.
        self.upstream = upstream
        self._connect = connect
        self.connected = asyncio.Event()
        if upstream is not None:
            self.connected.set()
        #: A LOGIN is being decided or connected (the login deadline leaves it be).
        self._login_pending = False
        #: The login deadline is closing the socket (its handshake is left to finish).
        self._deadline_closing = False
        self.env: str | None = None
        self.counting = True
        #: Watches of this socket holding a slot.
        self.held: set[str] = set()
        #: Held watches whose INIT_WATCH the upstream has not answered yet: watchId ->
        #: requestId. Only an upstream ERROR answering it frees the slot.
        self.unanswered: dict[str, Any] = {}
        self.closing = False
        #: ``realtime_unit: socket``: the socket holds the slot (taken at the upgrade) and
        #: frames are relayed without being read.
        self.opaque = route.route.realtime_unit == "socket"
        self._ending: asyncio.Task[None] | None = None
        if env is not None:
            self._set_env(env)

    # ------------------------------------------------------------------------- lifecycle

    def _set_env(self, env: str) -> None:
        self.state.unnamed_sockets.discard(self)
        self.env = env
        self.counting = self.state.env_modes.get(
            env, self.state.config.gateway.enforcement) != "off"
        self.state.sockets.setdefault(env, set()).add(self)

    async def run(self) -> None:
        metrics.REALTIME_SOCKETS.inc()
        relays = [asyncio.ensure_future(self._from_client()),
                  asyncio.ensure_future(self._from_upstream())]
        deadline = None
        if self.upstream is None:
            deadline = asyncio.ensure_future(self._login_deadline())
            if self.env is None:  # told to go away on shutdown too
                self.state.unnamed_sockets.add(self)
        try:
            await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.closing = True
            self.state.unnamed_sockets.discard(self)
            if deadline is not None:
                if self._deadline_closing:  # its close handshake: let it finish (bounded)
                    await asyncio.wait([deadline], timeout=2)
                deadline.cancel()
            for task in relays:
                task.cancel()
            for task in relays:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._release_all()  # before the close handshakes, which may take a while
            await self._close_both()
            if self.env is not None:
                peers = self.state.sockets.get(self.env)
                if peers is not None:
                    peers.discard(self)
                    if not peers:
                        del self.state.sockets[self.env]
            metrics.REALTIME_SOCKETS.dec()

    async def _login_deadline(self) -> None:
        """A socket that names no environment within the route's ``login_timeout_ms`` is
        closed (it holds a descriptor here, and nothing upstream)."""
        seconds = self.route.route.login_timeout_ms / 1000
        wait = seconds
        while True:
            try:
                await asyncio.wait_for(self.connected.wait(), wait)
                return
            except TimeoutError:
                if not self._login_pending:
                    break
                wait = 0.5  # a LOGIN is being decided or connected: see how it ends
        self._deadline_closing = True
        metrics.REALTIME_REFUSED.labels("ENVIRONMENT_REQUIRED").inc()
        await self._send_error(None, None, "ENVIRONMENT_REQUIRED",
                               f"no LOGIN naming an environment within {seconds:g} s")
        with contextlib.suppress(Exception):
            await self.client.close(code=1008, message=b"LOGIN required")

    async def _open_upstream(self, env: str, frame: dict[str, Any]) -> bool:
        """Connect upstream for ``env`` (admitted); False (the client told) if it fails."""
        assert self._connect is not None
        try:
            # Bounded: the SDK waits 5 s for LOGIN_RES, and the socket's deadline waits on it.
            async with asyncio.timeout(self.state.config.gateway.upstream.connect_timeout_ms
                                       / 1000 * 2):
                upstream = await self._connect(env)
        except (aiohttp.ClientError, TimeoutError) as exc:
            metrics.UPSTREAM_ERRORS.labels(
                "timeout" if isinstance(exc, TimeoutError) else "unavailable").inc()
            await self._refuse(frame, "UPSTREAM_UNAVAILABLE",
                               f"the realtime upstream failed: {type(exc).__name__}")
            with contextlib.suppress(Exception):
                await self.client.close(code=1011, message=b"upstream unavailable")
            return False
        if self.closing or self.client.closed:  # the client left meanwhile
            with contextlib.suppress(Exception):
                await upstream.close(code=1001)
            return False
        self.upstream = upstream
        self.connected.set()
        return True

    async def _up(self, data: str | bytes) -> None:
        assert self.upstream is not None
        if isinstance(data, bytes):
            await self.upstream.send_bytes(data)
        else:
            await self.upstream.send_str(data)

    async def _close_both(self) -> None:
        """Whoever closed first: its code goes to the other side and (the client's) back to
        it; a side lost without a close frame is 1001 to the upstream, 1011 to the client."""
        from_client = self.client.close_code
        if self.upstream is None:  # never connected
            with contextlib.suppress(Exception):
                await self.client.close(code=wire_close_code(from_client, lost=1011))
            return
        from_upstream = self.upstream.close_code
        if from_client is not None:  # the client closed (or went away) first
            to_upstream = wire_close_code(from_client, lost=1001)
            to_client = to_upstream
        else:
            to_client = wire_close_code(from_upstream, lost=1011)
            to_upstream = 1000 if from_upstream is None else to_client
        with contextlib.suppress(Exception):
            await self.upstream.close(code=to_upstream)
        with contextlib.suppress(Exception):
            await self.client.close(code=to_client)

    def _release_all(self) -> None:
        if self.held and self.env is not None:
            self.state.limiter.release(self.env, SLOT, len(self.held))
            metrics.REALTIME_WATCHES.dec(len(self.held))
        self.held.clear()
        self.unanswered.clear()

    def end_environment(self, status: str) -> None:
        """The environment was isolated or released: end every watch and the socket."""
        if self._ending is None and not self.closing:
            self._ending = asyncio.ensure_future(self._end(_ENDED_CODES.get(status, status)))

    async def _end(self, code: str) -> None:
        self.closing = True
        with contextlib.suppress(Exception):
            why = _ENDED_WHY.get(code, code)
            for wid in sorted(self.held):
                await self._send_error(wid, None, code, f"environment {self.env} {why}")
            await self.client.close(code=ENV_ENDED_CLOSE, message=code.encode()[:120])
        if self.upstream is not None:
            with contextlib.suppress(Exception):
                await self.upstream.close(code=1001)

    async def shutdown(self) -> None:
        """The gateway is stopping: going away (1001), the client reconnects elsewhere."""
        self.closing = True
        with contextlib.suppress(Exception):
            await self.client.close(code=1001, message=b"gateway shutting down")
        if self.upstream is not None:
            with contextlib.suppress(Exception):
                await self.upstream.close(code=1001)

    # ------------------------------------------------------------------- client -> upstream

    async def _from_client(self) -> None:
        async for msg in self.client:
            if msg.type is WSMsgType.TEXT:
                await self._client_text(msg.data)
            elif msg.type is WSMsgType.BINARY:
                if self.opaque:
                    await self._up(msg.data)
                elif self.route.route.strict:
                    await self._send_error(None, None, "INVALID_FRAME",
                                           "binary frames are not the watch protocol")
                else:  # read as the upstream's JSON.parse(buffer) would, passed on as it came
                    await self._client_text(msg.data.decode("utf-8", errors="replace"),
                                            msg.data)
            elif msg.type is WSMsgType.ERROR:
                log.info("realtime client error on %s: %s", self.env, self.client.exception())
                return

    async def _client_text(self, data: str, raw: bytes | None = None) -> None:
        """One client frame (``raw``: it came binary, and goes on so)."""
        out: str | bytes = data if raw is None else raw
        if self.opaque:
            await self._up(out)
            return
        frame = _frame(data)
        if frame is _UNREADABLE:
            # Could be a watch the upstream reads but this gateway cannot (too deep, escapes
            # it gave up on): never forwarded, whatever it seems to say.
            metrics.REALTIME_REFUSED.labels("INVALID_FRAME").inc()
            await self._send_error(None, None, "INVALID_FRAME",
                                   "a frame that is not readable JSON")
            return
        if not isinstance(frame, dict):
            if self.route.route.strict or self.upstream is None:
                metrics.REALTIME_REFUSED.labels("INVALID_FRAME").inc()
                await self._send_error(None, None, "INVALID_FRAME",
                                       "not a frame of the watch protocol" if self.upstream
                                       else "send LOGIN with msgData.envId first")
                return
            await self._up(out)
            return
        kind = frame["msgType"]
        if self.upstream is None and kind != "LOGIN":
            if kind == "PING":  # answered here: nothing goes upstream before a LOGIN
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await self.client.send_str(msgspec.json.encode({
                        "requestId": frame.get("requestId"), "msgType": "PONG",
                        "msgData": None}).decode())
                return
            await self._refuse(frame, "ENVIRONMENT_REQUIRED",
                               "send LOGIN with msgData.envId first")
            return
        await self._protocol(frame, kind, out)

    async def _protocol(self, frame: dict[str, Any], kind: str, data: str | bytes) -> None:
        """A client frame of the watch protocol; ``data``: what goes upstream, as it came."""
        if kind == "INIT_WATCH" or kind == "REBUILD_WATCH":
            await self._open_watch(frame, data)
        elif kind == "CLOSE_WATCH":
            wid = _watch_id(frame)
            if wid is not None and wid in self.held:
                self.held.discard(wid)
                self.unanswered.pop(wid, None)
                metrics.REALTIME_WATCHES.dec()
                if self.env is not None:
                    self.state.limiter.release(self.env, SLOT)
            await self._up(data)
        elif kind == "LOGIN":
            await self._login(frame, data)
        else:
            await self._up(data)

    async def _login(self, frame: dict[str, Any], data: str | bytes) -> None:
        named = _msg_env(frame)
        if named is None or named == self.env:
            if self.upstream is None:  # (self.env is None here: it would be connected)
                await self._refuse(frame, "ENVIRONMENT_REQUIRED",
                                   "LOGIN needs msgData.envId")
                return
            await self._up(data)
            return
        if self.env is not None:
            await self._refuse(frame, "ENVIRONMENT_MISMATCH",
                               f"this socket belongs to environment {self.env}")
            return
        if not isinstance(named, str) or not ENV_ID.fullmatch(named):
            await self._refuse(frame, "INVALID_ENV_ID",
                               "envId is not an environment id ([a-z0-9][a-z0-9-]{0,62})")
            return
        self._login_pending = True
        try:
            if self.state.env_modes.get(named,
                                        self.state.config.gateway.enforcement) != "off":
                # Lifecycle and QPS of the environment, no call counted.
                decision = await self._decide(named, 0, "", frame)
                if decision is None or not await self._admitted(decision, frame):
                    return
            if self.closing:
                return
            self._set_env(named)
            if self.upstream is None and not await self._open_upstream(named, frame):
                return
        finally:
            self._login_pending = False
        await self._up(data)

    async def _open_watch(self, frame: dict[str, Any], data: str | bytes) -> None:
        wid = _watch_id(frame)
        if wid is None:  # an uncountable watch is never forwarded
            await self._refuse(frame, "INVALID_FRAME",
                               f"{frame['msgType']} needs a watchId string of 1 to "
                               f"{MAX_WATCH_ID} characters")
            return
        # Frames of the protocol reach here only once the environment is named (the upgrade,
        # or a LOGIN before the upstream was connected).
        assert self.env is not None
        named = _msg_env(frame)
        if named is not None and named != self.env:
            await self._refuse(frame, "ENVIRONMENT_MISMATCH",
                               f"this socket belongs to environment {self.env}")
            return
        if wid in self.held:  # a rebuild (or a repeat) of a held watch takes nothing more
            await self._up(data)
            return
        if not self.counting:
            await self._up(data)
            return
        decision = await self._decide(self.env, self.route.cost, SLOT, frame)
        if decision is None:
            return
        if self.closing:  # the socket ended while the store answered
            if decision.slot_held:
                self.state.limiter.release(self.env, SLOT)
            return
        if not await self._admitted(decision, frame):
            if decision.slot_held:  # (never: a refusal takes no slot)
                self.state.limiter.release(self.env, SLOT)
            return
        if decision.slot_held:
            self.held.add(wid)
            self.unanswered[wid] = frame.get("requestId")
            metrics.REALTIME_WATCHES.inc()
        await self._up(data)

    async def _decide(self, env: str, cost: int, slot: str,
                      frame: dict[str, Any]) -> Decision | None:
        """The decision, or None after answering a store failure (fail-closed)."""
        decision = await decide(self.state.limiter, env, "realtime", cost, slot)
        if isinstance(decision, Problem):
            await self._refuse(frame, "STORE_UNAVAILABLE", decision.detail)
            return None
        if decision.admitted:  # the environment's bandwidth, for the frames to this socket
            self.state.limiter.bandwidth.rate_of(env, decision.bandwidth,
                                                 decision.store_bypassed)
        return decision

    async def _admitted(self, decision: Decision, frame: dict[str, Any]) -> bool:
        """True if admitted; else answers with the ERROR frame (and ends the socket when the
        environment is isolated or gone)."""
        if decision.admitted:
            return True
        code = ERROR_CODES.get(decision.outcome, "REFUSED")
        metrics.REALTIME_REFUSED.labels(code).inc()
        problem = refusal(decision, self.env or _msg_env(frame) or "")
        await self._send_error(_watch_id(frame), frame.get("requestId"), code, problem.detail)
        if decision.outcome in _ENDS_SOCKET:
            self.end_environment(code)
        return False

    # ------------------------------------------------------------------- upstream -> client

    async def _from_upstream(self) -> None:
        await self.connected.wait()
        assert self.upstream is not None
        bandwidth = self.state.limiter.bandwidth
        stack = contextlib.AsyncExitStack()
        pacer: Pacer | None = None
        try:
            async for msg in self.upstream:
                # Frames to the client count to the environment's bandwidth (its gateway
                # version's, as the last decision of the environment here told it, or the
                # file declares it: a version that changed or expired changes it), sent whole
                # once their bytes' time has come.
                rate = bandwidth.rates.get(self.env, 0) if self.env is not None else 0
                if (pacer.rate if pacer is not None else 0) != rate:
                    await stack.aclose()
                    pacer = None
                    if rate and self.env is not None:
                        pacer = await stack.enter_async_context(
                            bandwidth.shaping(self.env, rate))
                if msg.type is WSMsgType.TEXT:
                    data = msg.data
                    if self.held and ("ERROR" in data or self.unanswered):
                        self._upstream_answer(data)
                    if pacer is not None:
                        await wait_for(pacer, len(data.encode()))  # bytes, not characters
                    await self.client.send_str(data)
                elif msg.type is WSMsgType.BINARY:
                    if pacer is not None:
                        await wait_for(pacer, len(msg.data))
                    await self.client.send_bytes(msg.data)
                elif msg.type is WSMsgType.ERROR:
                    log.info("realtime upstream error on %s: %s", self.env,
                             self.upstream.exception())
                    return
        finally:
            await stack.aclose()

    def _upstream_answer(self, data: str) -> None:
        """An upstream ERROR for a held watch: the SDK drops that watch (it sends no
        CLOSE_WATCH), so its slot comes back now. The first event of a held watch marks it
        opened."""
        frame = _decode(data)
        if not isinstance(frame, dict):
            return
        wid = frame.get("watchId")
        if not isinstance(wid, str) or wid not in self.held:
            return
        kind = frame.get("msgType")
        if kind == "ERROR":
            self.unanswered.pop(wid, None)
            self.held.discard(wid)
            metrics.REALTIME_WATCHES.dec()
            if self.env is not None:
                self.state.limiter.release(self.env, SLOT)
            # Uncounted from now on, so ended upstream too: a watch the ERROR did not end
            # there (a failed rebuild of an open one) must not go on uncounted. A client that
            # still wants it opens it again, counted.
            self._close_upstream_watch(wid)
        elif kind in ("INIT_EVENT", "NEXT_EVENT", "CHECK_EVENT"):
            self.unanswered.pop(wid, None)  # it opened

    def _close_upstream_watch(self, wid: str) -> None:
        frame = msgspec.json.encode({"watchId": wid, "requestId": f"quotagate-close-{wid}",
                                     "msgType": "CLOSE_WATCH", "msgData": None}).decode()
        task = asyncio.ensure_future(self._up(frame))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # ------------------------------------------------------------------------------ errors

    async def _refuse(self, frame: dict[str, Any], code: str, message: str) -> None:
        metrics.REALTIME_REFUSED.labels(code).inc()
        await self._send_error(_watch_id(frame), frame.get("requestId"), code, message)

    async def _send_error(self, wid: str | None, request_id: Any, code: str,
                          message: str) -> None:
        if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
            request_id = None
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.client.send_str(msgspec.json.encode({
                "watchId": wid, "requestId": request_id, "msgType": "ERROR",
                "msgData": {"code": code, "message": message},
            }).decode())


async def handle_upgrade(request: web.Request, state: GatewayState, route: CompiledRoute,
                         env: str | None, path_qs: str, request_id: str) -> web.StreamResponse:
    """A WebSocket upgrade on a realtime route: checks, upstream socket, then the relay."""
    gw = state.config.gateway
    per_socket = route.route.realtime_unit == "socket"
    if env is None and per_socket:
        metrics.INVALID_REQUESTS.labels("invalid-environment").inc()
        return missing_environment(state.env_suffixes).response(request_id=request_id)
    holds = False
    if env is not None and state.env_modes.get(env, gw.enforcement) != "off":
        if per_socket:
            decision = await decide(state.limiter, env, "realtime", route.cost, SLOT)
        else:  # lifecycle and QPS; watches are counted one by one
            decision = await decide(state.limiter, env, "realtime", 0)
        if isinstance(decision, Problem):
            return decision.response(request_id=request_id)
        if not decision.admitted:
            if decision.outcome in _ENDS_SOCKET:  # the SDK stops on 3050 (an HTTP refusal of
                return await _end_at_once(request, decision, env, request_id)  # the upgrade
            return refusal(decision, env).response(request_id=request_id)  # it retries)
        holds = decision.slot_held
    try:
        return await _relay(request, state, route, env, path_qs, request_id)
    finally:
        if holds:
            assert env is not None
            state.limiter.release(env, SLOT)


async def _end_at_once(request: web.Request, decision: Decision, env: str,
                       request_id: str) -> web.WebSocketResponse:
    """An isolated or unknown environment's socket: accepted, told why, closed with 3050 —
    what the SDK takes for "stop" (an HTTP 403/404 to the upgrade, it retries)."""
    code = ERROR_CODES.get(decision.outcome, "REFUSED")
    metrics.REALTIME_REFUSED.labels(code).inc()
    ws = web.WebSocketResponse()
    ws.headers["X-Request-Id"] = request_id
    await ws.prepare(request)
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.send_str(msgspec.json.encode({
            "watchId": None, "requestId": None, "msgType": "ERROR",
            "msgData": {"code": code, "message": refusal(decision, env).detail}}).decode())
    await ws.close(code=ENV_ENDED_CLOSE, message=code.encode()[:120])
    return ws


async def _relay(request: web.Request, state: GatewayState, route: CompiledRoute,
                 env: str | None, path_qs: str, request_id: str) -> web.StreamResponse:
    """The client's socket and its upstream twin: connected now when the upgrade names the
    environment, else once LOGIN names one that is admitted (nothing goes upstream before)."""
    session = state.pool.ws_session
    assert session is not None
    headers = forward_request_headers(request, env or "", request_id)
    for name in _HANDSHAKE:
        headers.popall(name, None)
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
               if p.strip()]
    limit = route.route.max_frame_bytes
    url = URL(route.upstream_url(path_qs), encoded=True)

    # Connected later (after LOGIN), the upstream is offered only what the client was told.
    protocols = offered

    async def connect(env_id: str) -> aiohttp.ClientWebSocketResponse:
        headers["X-CloudBase-Env"] = env_id
        upstream = await session.ws_connect(url, headers=headers, protocols=protocols,
                                            max_msg_size=limit, autoping=True,
                                            heartbeat=HEARTBEAT_S)
        if protocols is not offered and upstream.protocol != (protocols[0] if protocols
                                                              else None):
            await upstream.close()
            raise aiohttp.ClientError(f"the upstream chose subprotocol {upstream.protocol!r}")
        return upstream

    upstream = None
    if env is not None:
        try:
            upstream = await connect(env)
        except aiohttp.WSServerHandshakeError as exc:
            metrics.UPSTREAM_ERRORS.labels("unavailable").inc()
            return upstream_unavailable(
                env, f"upstream {route.origin} refused the WebSocket upgrade: {exc.status}"
            ).response(request_id=request_id)
        except TimeoutError:
            metrics.UPSTREAM_ERRORS.labels("timeout").inc()
            return upstream_timeout(env, f"upstream {route.origin} did not answer in time"
                                    ).response(request_id=request_id)
        except aiohttp.ClientError as exc:
            metrics.UPSTREAM_ERRORS.labels("unavailable").inc()
            return upstream_unavailable(
                env, f"upstream {route.origin} failed: {type(exc).__name__}"
            ).response(request_id=request_id)
    # The subprotocol: the upstream's choice; before it is connected, the client's first.
    chosen = upstream.protocol if upstream is not None else (offered[0] if offered else None)
    if upstream is None:
        protocols = [chosen] if chosen else []
    # autoclose off: the client's close is answered with its own code (_close_both), not
    # aiohttp's 1000, on which the SDK would reconnect.
    client = web.WebSocketResponse(
        protocols=(chosen,) if chosen else (), max_msg_size=limit,
        autoping=True, autoclose=False, heartbeat=HEARTBEAT_S)
    client.headers["X-Request-Id"] = request_id
    try:
        await client.prepare(request)
    except Exception:
        if upstream is not None:
            await upstream.close()
        raise
    await RealtimeSocket(state, route, env, client, upstream, connect).run()
    return client
