"""Slow and idle clients are bounded (gateway.yaml ``clients``):

- a connection must send a complete request head within ``header_timeout_ms`` of opening or
  of the end of its previous response (aiohttp's keep-alive timer, which runs from the
  connection's start and is not reset by partial data: idle sockets and slowloris header
  senders are closed alike);
- bodies the gateway reads before deciding come within ``body_timeout_ms`` (app.py, 408);
- at most ``max_connections`` open client connections per instance: one more is answered
  ``503 too-many-connections`` and closed before anything of it is read;
- the descriptor limit is raised to the hard limit at start (a gateway holds two sockets per
  proxied client), logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from quotagate.common import metrics
from quotagate.common.problem import TYPE_BASE
from quotagate.gateway.problems import CODES, too_many_connections
from quotagate.settings.schema import ClientSettings

log = logging.getLogger("quotagate.server")

#: Descriptors kept aside from the derived connection cap (store, upstream pool, logs).
RESERVED_FDS = 64
#: How long a refused connection stays open after its refusal (for the client to read it).
REFUSED_LINGER_S = 1.0


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


def connection_cap(settings: ClientSettings, nofile: int) -> int:
    """``max_connections``, or (0) half of what the descriptor limit leaves after a reserve:
    each proxied client may hold an upstream socket too."""
    if settings.max_connections:
        return settings.max_connections
    return max(16, (nofile - RESERVED_FDS) // 2)


def _refusal_bytes(limit: int) -> bytes:
    problem = too_many_connections(limit)
    body = json.dumps({"type": TYPE_BASE + problem.type_suffix, "title": problem.title,
                       "status": problem.status, "detail": problem.detail,
                       "code": CODES[problem.type_suffix], "message": problem.detail}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"
            f"Retry-After: {problem.retry_after_s}\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class ConnectionCap:
    """Counts the public listener's connections (through the aiohttp server's own
    connection_made / connection_lost) and refuses those beyond ``limit``."""

    def __init__(self, server: web.Server, limit: int):
        self.limit = limit
        self.open: set[RequestHandler] = set()
        self._refusal = _refusal_bytes(limit)
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            if len(self.open) >= self.limit:
                metrics.CONNECTIONS_REFUSED.inc()
                # Nothing of it is read; the refusal goes out with a FIN, and the socket is
                # closed a moment later (closing at once with the client's request unread
                # would reset the connection, and could lose the refusal).
                transport.pause_reading()
                transport.write(self._refusal)
                if transport.can_write_eof():
                    transport.write_eof()
                asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)
                return
            self.open.add(handler)
            metrics.CLIENT_CONNECTIONS.set(len(self.open))

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            lost(handler, exc)
            if handler in self.open:
                self.open.discard(handler)
                metrics.CLIENT_CONNECTIONS.set(len(self.open))

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]


def server_kwargs(settings: ClientSettings) -> dict[str, Any]:
    """The aiohttp server's keyword arguments for these settings."""
    return {"keepalive_timeout": settings.header_timeout_ms / 1000}
