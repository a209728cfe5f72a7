"""The realtime relay (SPEC §8): one client WebSocket and its upstream twin, frames relayed
both ways; the client's are read, the upstream's passed on (and paced to the environment's
bandwidth).

One client WebSocket multiplexes many watches; every frame is JSON ``{watchId, requestId,
msgType, msgData}`` (frames.py). The gateway reads only the client's:

- ``LOGIN`` names the environment (``msgData.envId``) when the upgrade did not (host or
  header); an isolated or unknown one ends the socket, another env than the upgrade's is refused;
- ``INIT_WATCH``, ``REBUILD_WATCH`` and ``CLOSE_WATCH`` take and give back watch slots
  (watches.py), as does any upstream ``ERROR`` for a held watch;
- anything else is passed through untouched (``strict: true`` refuses what is not the protocol).

With ``realtime_unit: socket`` each WebSocket holds one slot instead, taken at the upgrade
(upgrade.py), and frames are not read at all.

Close codes as the SDK reads them: the client's own close code is echoed back to it and sent
to the upstream (the SDK closes with 3001 after its last watch); a socket ended because its
environment is isolated or gone closes with 3050 (the SDK stops rather than reconnecting); an
upstream lost without a close frame closes the client with 1011. 1005, 1006 and 1015 are
never sent (RFC 6455 §7.4.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from quotagate.common import metrics
from quotagate.common.envids import ENV_ID
from quotagate.gateway.realtime.frames import (
    ENV_ENDED_CLOSE,
    UNREADABLE,
    error_frame,
    msg_env,
    pong_frame,
    read_frame,
    watch_id,
    wire_close_code,
)
from quotagate.gateway.realtime.watches import WatchSlots
from quotagate.gateway.routing import CompiledRoute
from quotagate.gateway.state import GatewayState
from quotagate.limiter.bandwidth import Pacer, wait_for

log = logging.getLogger("quotagate.realtime")

_ENDED_CODES = {"isolated": "ENVIRONMENT_ISOLATED", "not-started": "ENVIRONMENT_ISOLATED",
                "not-found": "ENVIRONMENT_NOT_FOUND"}
_ENDED_WHY = {"ENVIRONMENT_ISOLATED": "is isolated (its plan expired or has not started): "
                                      "renew it to watch again",
              "ENVIRONMENT_NOT_FOUND": "is unknown or released"}


class RealtimeSocket(WatchSlots):
    """One client WebSocket and its upstream twin: relays frames, holds its watches' slots
    (``WatchSlots``, watches.py)."""

    def __init__(self, state: GatewayState, route: CompiledRoute, env: str | None,
                 client: web.WebSocketResponse,
                 upstream: aiohttp.ClientWebSocketResponse | None,
                 connect: Callable[[str], Awaitable[aiohttp.ClientWebSocketResponse]]
                 | None = None):
        super().__init__()
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
        frame = read_frame(data)
        if frame is UNREADABLE:
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
                    await self.client.send_str(pong_frame(frame.get("requestId")))
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
            self._close_watch(frame)
            await self._up(data)
        elif kind == "LOGIN":
            await self._login(frame, data)
        else:
            await self._up(data)

    async def _login(self, frame: dict[str, Any], data: str | bytes) -> None:
        named = msg_env(frame)
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


    # ------------------------------------------------------------------------------ errors

    async def _refuse(self, frame: dict[str, Any], code: str, message: str) -> None:
        metrics.REALTIME_REFUSED.labels(code).inc()
        await self._send_error(watch_id(frame), frame.get("requestId"), code, message)

    async def _send_error(self, wid: str | None, request_id: Any, code: str,
                          message: str) -> None:
        if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
            request_id = None
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.client.send_str(error_frame(wid, request_id, code, message))
