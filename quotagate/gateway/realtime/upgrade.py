"""A WebSocket upgrade on a realtime route (``handle_upgrade``), handed over by the HTTP door
through the state (``GatewayState.upgrade``, set by ``gateway/app.py``): the environment's
lifecycle and QPS checked (with ``realtime_unit: socket``, the socket's one slot taken), the
upstream socket opened, then the relay (relay.py) until either side closes.

An upgrade that names no environment is accepted and waits for ``LOGIN`` (nothing goes
upstream before); one whose environment is isolated or unknown is accepted, told why and
closed with 3050, which the SDK takes for "stop" (an HTTP refusal it would retry).
"""

from __future__ import annotations

import contextlib

import aiohttp
from aiohttp import web
from multidict import istr
from yarl import URL

from quotagate.common import metrics
from quotagate.gateway.decisions import decide
from quotagate.gateway.envid import missing_environment
from quotagate.gateway.problems import (
    Problem,
    refusal,
    upstream_timeout,
    upstream_unavailable,
)
from quotagate.gateway.realtime.frames import (
    ENDS_SOCKET,
    ENV_ENDED_CLOSE,
    ERROR_CODES,
    error_frame,
)
from quotagate.gateway.realtime.relay import RealtimeSocket
from quotagate.gateway.realtime.watches import SLOT
from quotagate.gateway.routing import CompiledRoute
from quotagate.gateway.state import GatewayState
from quotagate.gateway.upstream import forward_request_headers
from quotagate.limiter.limiter import Decision

#: Handshake fields aiohttp sets itself for the upstream hop.
_HANDSHAKE = frozenset(istr(h) for h in (
    "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol", "Sec-WebSocket-Accept"))

#: Seconds between WebSocket pings on both sides: a half-open socket (a phone that changed
#: networks) is dropped, and its watches freed, within 1.5 x this.
HEARTBEAT_S = 30.0


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
            if decision.outcome in ENDS_SOCKET:  # the SDK stops on 3050 (an HTTP refusal of
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
        await ws.send_str(error_frame(None, None, code, refusal(decision, env).detail))
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
