"""Slow and idle clients are bounded on every listener (gateway.yaml ``clients``):

- a connection must send a complete request head within ``header_timeout_ms`` of opening or
  of the end of its previous response (aiohttp's keep-alive timer, which runs from the
  connection's start and is not reset by partial data: idle sockets and slowloris header
  senders are closed alike), on the public, ``authz_listen`` and ``admin_listen`` listeners;
  ``authz.grpc_listen`` (plugin/rls.py) closes a connection that opens no call within it, a call
  whose request message does not come within it, and a connection with no call open for
  ``grpc_idle_timeout_ms``;
- bodies the gateway reads before deciding come within ``body_timeout_ms`` (proxy/handler.py
  and plugin/authz.py, 408);
- each listener holds at most its own cap of open connections (``connection_caps``): one more
  is refused at once (HTTP: ``503 too-many-connections``; gRPC: GOAWAY) and closed before
  anything of it is read;
- the caps are shares of one descriptor budget, so a flood on one listener can never take the
  descriptors another needs; the descriptor limit is raised to the hard limit at start
  (logged).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from quotagate.common import metrics
from quotagate.common.problem import TYPE_BASE
from quotagate.gateway.problems import CODES, too_many_connections
from quotagate.settings.schema import ClientSettings

log = logging.getLogger("quotagate.server")

#: Descriptors kept aside from the connection caps (store, upstream pool, logs, the loop's own).
RESERVED_FDS = 64
#: How long a refused connection stays open after its refusal (for the client to read it).
REFUSED_LINGER_S = 1.0
#: Refused connections a listener keeps for REFUSED_LINGER_S at most; more (a flood) are
#: closed as soon as the refusal is written.
REFUSED_LINGER_MAX = 16
#: The smallest cap a listener's share gives it.
MIN_CAP = 16
PUBLIC = "public"
#: Each private listener: the divisor of the descriptor budget its derived cap takes, the
#: setting that overrides it, and its name in gateway.yaml.
PRIVATE: dict[str, tuple[int, str, str]] = {
    "authz": (8, "authz_max_connections", "authz_listen"),
    "grpc": (8, "grpc_max_connections", "authz.grpc_listen"),
    "admin": (32, "admin_max_connections", "admin_listen"),
}


def raise_nofile() -> int:
    """Raise the soft descriptor limit to the hard one; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, hard,
                        exc)
            return soft
        log.info("descriptor limit raised from %d to %d (the hard limit)", soft, hard)
        return hard
    return soft


def connection_caps(settings: ClientSettings, nofile: int, private: Iterable[str] = ()
                    ) -> dict[str, int]:
    """The connection cap of each listener this process serves (``private``: those of
    "authz", "grpc", "admin" it serves besides the public one): its setting, or (0) its share
    of the descriptor budget, the limit less RESERVED_FDS. ``authz_listen`` and
    ``authz.grpc_listen`` take an eighth of it each, ``admin_listen`` a thirty-second (at
    least MIN_CAP each); the public listener half of what they and every listener's refusals
    in flight leave (each proxied client may hold an upstream socket too)."""
    budget = max(0, nofile - RESERVED_FDS)
    caps: dict[str, int] = {}
    for name in private:
        divisor, key, _ = PRIVATE[name]
        caps[name] = getattr(settings, key) or max(MIN_CAP, budget // divisor)
    left = budget - sum(caps.values()) - REFUSED_LINGER_MAX * (len(caps) + 1)
    return {PUBLIC: settings.max_connections or max(MIN_CAP, left // 2), **caps}


def descriptors_needed(caps: dict[str, int]) -> int:
    """The descriptors these caps may hold at once, the reserve included."""
    return (RESERVED_FDS + 2 * caps.get(PUBLIC, 0)
            + sum(n for name, n in caps.items() if name != PUBLIC)
            + REFUSED_LINGER_MAX * len(caps))


class Listener:
    """One listener's open connections against its cap, its refusals and its metrics."""

    def __init__(self, name: str, limit: int):
        self.name = name
        self.limit = limit
        #: Its cap's setting, and what the cap counts (for the refusal's words).
        self.setting = ("clients.max_connections" if name == PUBLIC
                        else f"clients.{PRIVATE[name][1]}")
        self.what = ("client connections" if name == PUBLIC
                     else f"connections on {PRIVATE[name][2]}")
        self.open = 0
        self.lingering = 0
        self._gauge = metrics.LISTENER_CONNECTIONS.labels(name)
        self._refused = metrics.LISTENER_REFUSED.labels(name)

    def full(self) -> bool:
        return self.open >= self.limit

    def opened(self) -> None:
        self.open += 1
        self._counted()

    def closed(self) -> None:
        self.open -= 1
        self._counted()

    def _counted(self) -> None:
        self._gauge.set(self.open)
        if self.name == PUBLIC:  # (the metric of earlier versions, kept)
            metrics.CLIENT_CONNECTIONS.set(self.open)

    def refuse(self, transport: asyncio.Transport, goodbye: bytes) -> None:
        """Refuse a connection beyond the cap: nothing of it is read; ``goodbye`` goes out
        with a FIN, and the socket is closed a moment later (closing at once with the client's
        request unread would reset the connection, and could lose the refusal), unless
        REFUSED_LINGER_MAX refusals already wait so (a flood): then at once."""
        self._refused.inc()
        if self.name == PUBLIC:
            metrics.CONNECTIONS_REFUSED.inc()
        transport.pause_reading()
        transport.write(goodbye)
        if transport.can_write_eof():
            transport.write_eof()
        loop = asyncio.get_running_loop()
        if self.lingering >= REFUSED_LINGER_MAX:
            # (soon, not now: aiohttp starts its handler's task after connection_made)
            loop.call_soon(transport.close)
            return
        self.lingering += 1

        def close() -> None:
            self.lingering -= 1
            transport.close()

        loop.call_later(REFUSED_LINGER_S, close)


def _refusal_bytes(listener: Listener) -> bytes:
    problem = too_many_connections(listener.limit, listener.setting, listener.what)
    body = json.dumps({"type": TYPE_BASE + problem.type_suffix, "title": problem.title,
                       "status": problem.status, "detail": problem.detail,
                       "code": CODES[problem.type_suffix], "message": problem.detail}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"
            f"Retry-After: {problem.retry_after_s}\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class ConnectionCap:
    """Counts an HTTP listener's connections (through the aiohttp server's own
    connection_made / connection_lost) and refuses those beyond its cap with a 503."""

    def __init__(self, server: web.Server, listener: Listener):
        self.listener = listener
        self.limit = listener.limit
        self.open: set[RequestHandler] = set()
        refusal = _refusal_bytes(listener)
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            if listener.full():
                listener.refuse(transport, refusal)
                return
            self.open.add(handler)
            listener.opened()

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            lost(handler, exc)
            if handler in self.open:
                self.open.discard(handler)
                listener.closed()

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]


def server_kwargs(settings: ClientSettings) -> dict[str, Any]:
    """An aiohttp server's keyword arguments for these settings (any of its listeners)."""
    return {"keepalive_timeout": settings.header_timeout_ms / 1000}
