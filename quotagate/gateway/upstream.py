"""The upstreams, as every front door on the public port reaches them: pooled connections, the
request headers forwarded (hop-by-hop ones dropped as RFC 9110 §7.6.1 asks), and streaming
HTTP proxying — bodies streamed both ways (never buffered), SSE flushed per chunk.

Shared core: the HTTP door (``gateway/proxy/handler.py``) forwards through
``UpstreamPool.forward``; the realtime door (``gateway/realtime/upgrade.py``) opens its
upstream sockets on ``UpstreamPool.ws_session`` with ``forward_request_headers``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiMapping, istr
from yarl import URL

from quotagate.common import metrics
from quotagate.gateway.problems import upstream_timeout, upstream_unavailable
from quotagate.gateway.routing import CompiledRoute
from quotagate.gateway.streams import is_stream_type
from quotagate.limiter.bandwidth import BandwidthUnavailable, Pacer, send_shaped
from quotagate.settings.schema import UpstreamSettings

#: Connection-specific fields never forwarded (RFC 9110 §7.6.1), plus any the Connection
#: field names.
HOP_BY_HOP = frozenset(
    istr(h)
    for h in (
        "Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding",
        "Upgrade", "Proxy-Authenticate", "Proxy-Authorization",
    )
)
#: Set by the client library for the upstream hop, not copied from the client. Expect: the
#: gateway answers 100-continue itself when it reads the body.
_REQUEST_DROP = HOP_BY_HOP | {istr("Host"), istr("Expect")}
VIA = "1.1 quotagate"
_RESPONSE_DROP = HOP_BY_HOP | {istr("Content-Length")}


def _connection_listed(headers: MultiMapping[str]) -> set[istr]:
    listed: set[istr] = set()
    for value in headers.getall("Connection", []):
        listed.update(istr(t.strip()) for t in value.split(",") if t.strip())
    return listed


def _looks_like_env(name: str) -> bool:
    """X_CloudBase_Env and the like: a CGI/WSGI upstream folds ``_`` into ``-`` and would
    read it as the environment header, beside (or instead of) the one the gateway sets."""
    return name.replace("_", "-").lower() == "x-cloudbase-env"


def forward_request_headers(request: web.Request, env: str, request_id: str) -> CIMultiDict[str]:
    drop = _REQUEST_DROP | _connection_listed(request.headers)
    out: CIMultiDict[str] = CIMultiDict(
        (k, v) for k, v in request.headers.items()
        if k not in drop and not ("_" in k and _looks_like_env(k))
    )
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Proto"] = request.scheme
    if request.host:
        out["X-Forwarded-Host"] = request.host
    if env:  # "": a CORS preflight that named none
        out["X-CloudBase-Env"] = env
    out["X-Request-Id"] = request_id
    out.add("Via", VIA)  # RFC 9110 §7.6.3: a proxy adds itself
    return out


class Tally:
    """What one proxied exchange used, for the meters charged after it."""

    __slots__ = ("answered", "body_bytes", "done_at", "sent_at", "streamed")

    def __init__(self) -> None:
        self.sent_at = 0.0
        self.done_at = 0.0
        #: Response body bytes written to the client.
        self.body_bytes = 0
        #: The upstream answered (a status line came back). A call it never answered (the
        #: gateway's 502/504) is given back.
        self.answered = False
        #: The response is a stream (SSE, NDJSON: streams.STREAM_TYPES).
        self.streamed = False

    @property
    def run_ms(self) -> int:
        """Upstream run time, from sending the request to the end of its response (ceil ms)."""
        if not self.sent_at:
            return 0
        end = self.done_at or time.perf_counter()
        return max(0, int(-(-(end - self.sent_at) * 1000 // 1)))


def _unanswered(tally: Tally, reached: bool) -> None:
    """The upstream never answered: the call is given back (``answered`` stays False). A
    request that reached it (sent, then silence or a dropped connection) may have run: its
    run time so far is metered (GBs); one that never connected ran nothing."""
    if reached:
        tally.done_at = time.perf_counter()
    else:
        tally.done_at = tally.sent_at = 0.0


class UpstreamPool:
    """One pooled aiohttp client session for every upstream."""

    def __init__(self, settings: UpstreamSettings):
        self.settings = settings
        self.session: aiohttp.ClientSession | None = None
        #: WebSockets (realtime): each holds its upstream connection for its whole life, so
        #: they must not count against the keep-alive pool's limit (nor be pooled).
        self.ws_session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=self.settings.pool_size, keepalive_timeout=30,
            ttl_dns_cache=60,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.settings.connect_timeout_ms / 1000,
                sock_read=self.settings.read_timeout_ms / 1000,
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.ws_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True, ttl_dns_cache=60),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.settings.connect_timeout_ms / 1000,
                sock_read=self.settings.read_timeout_ms / 1000,
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        for session in (self.session, self.ws_session):
            if session is not None:
                await session.close()

    async def forward(
        self,
        request: web.Request,
        route: CompiledRoute,
        env: str,
        path_qs: str,
        request_id: str,
        extra_headers: dict[str, str],
        tally: Tally | None = None,
        body: bytes | AsyncIterable[bytes] | None = None,
        pacer: Pacer | None = None,
    ) -> web.StreamResponse:
        """``body``: the request's body when it was read already (action routes), or what
        was read of it and then the rest (stream probes), else it is streamed from the
        client. ``pacer``: the response body goes out at the environment's bandwidth."""
        assert self.session is not None
        headers = forward_request_headers(request, env, request_id)
        data: Any = body if body is not None else (
            request.content if request.body_exists else None)
        if tally is not None:
            tally.sent_at = time.perf_counter()
        try:
            upstream = await self.session.request(
                request.method,
                # encoded=True: the client's path and query go on byte for byte.
                URL(route.upstream_url(path_qs), encoded=True),
                headers=headers,
                data=data,
                allow_redirects=False,
                compress=False,
            )
        except TimeoutError as exc:
            metrics.UPSTREAM_ERRORS.labels("timeout").inc()
            if tally is not None:  # the call is given back; run time only if it was sent
                _unanswered(tally, reached=not isinstance(exc, aiohttp.ConnectionTimeoutError))
            problem = upstream_timeout(env, f"upstream {route.origin} did not answer in time")
            return problem.response(extra_headers, request_id)
        except aiohttp.ClientError as exc:
            metrics.UPSTREAM_ERRORS.labels("unavailable").inc()
            if tally is not None:
                _unanswered(tally, reached=not isinstance(exc, aiohttp.ClientConnectorError))
            return upstream_unavailable(
                env, f"upstream {route.origin} failed: {type(exc).__name__}"
            ).response(extra_headers, request_id)

        if tally is not None:
            tally.answered = True
            tally.streamed = is_stream_type(upstream.headers.get("Content-Type", ""))
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            drop = _RESPONSE_DROP | _connection_listed(upstream.headers)
            for name, value in upstream.headers.items():
                if name not in drop:
                    response.headers.add(name, value)
            response.headers.add("Via", VIA)
            response.headers.update(extra_headers)
            response.headers["X-Request-Id"] = request_id
            length = upstream.content_length
            chunked = upstream.headers.get("Transfer-Encoding", "").lower().endswith("chunked")
            if length is not None and not chunked:
                response.content_length = length
            await response.prepare(request)
            if pacer is not None:
                async for chunk in upstream.content.iter_any():
                    await send_shaped(pacer, chunk, response.write)
                    if tally is not None:
                        tally.body_bytes += len(chunk)
            elif tally is None:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            else:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                    tally.body_bytes += len(chunk)
            await response.write_eof()
            return response
        except (TimeoutError, aiohttp.ClientError, ConnectionError, BandwidthUnavailable) as exc:
            # The status line is gone already: all we can do is cut the client's connection,
            # so the client sees a truncated response rather than a clean end.
            if not isinstance(exc, BandwidthUnavailable):  # (the store's, counted there)
                metrics.UPSTREAM_ERRORS.labels("aborted").inc()
            if request.transport is not None:
                request.transport.abort()
            return response
        finally:
            if tally is not None:
                tally.done_at = time.perf_counter()
            upstream.release()
