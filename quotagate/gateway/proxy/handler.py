"""The HTTP front door's handler (``handle``), served on the public listener that
``gateway/app.py`` composes.

A request flows: environment id (host or header, validated) -> route (prefix, method, Accept)
-> one limiter decision (one EVALSHA, pipelined with concurrent ones) -> refusal as
problem+json, or a streamed proxy to the upstream with RateLimit headers
(``gateway/upstream.py``). A WebSocket upgrade on a realtime route goes to the realtime door
through the state (``GatewayState.upgrade``); this door never imports it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, Awaitable
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aredis
from aiohttp import web

from quotagate.common import metrics
from quotagate.common.logs import decisions as decisions_log
from quotagate.control.lifecycle import QUEUE_MAX_BODY, enqueue
from quotagate.gateway import streams
from quotagate.gateway.accesslog import Entry
from quotagate.gateway.actions import read_action, read_body
from quotagate.gateway.decisions import decide, decided_now
from quotagate.gateway.envid import environment_of, missing_environment
from quotagate.gateway.headers import ratelimit_headers
from quotagate.gateway.headers import request_id as request_id_of
from quotagate.gateway.problems import (
    Problem,
    body_too_large,
    invalid_function,
    invalid_path,
    queue_full,
    refusal,
    request_timeout,
    route_not_found,
    store_unavailable,
    websocket_required,
)
from quotagate.gateway.routing import DOT_SEGMENT, WRITE_METHODS, CompiledRoute, is_preflight
from quotagate.gateway.state import STATE, GatewayState
from quotagate.gateway.upstream import Tally
from quotagate.limiter.codes import Flag, Outcome
from quotagate.limiter.limiter import Decision

log = logging.getLogger("quotagate.gateway")

_REASONS = {o: o.name.lower().replace("_", "-") for o in Outcome}
# Bound once: the hot path must not look labels up per request.
_ADMITTED = metrics.DECISIONS.labels("admitted", "")
_OFF = metrics.DECISIONS.labels("off", "")


def _origin_form(request: web.Request) -> str | None:
    """The path and query to forward, or None to refuse the request target.

    Routing matches the decoded path and the upstream gets the raw one, so a target whose
    decoded path holds dot-segments (``/database/%2e%2e/ai/chat``) is refused: an upstream that
    normalises it would serve a route other than the one charged. An absolute-form target
    (``GET http://host/path``) is forwarded by its path and query.
    """
    if DOT_SEGMENT.search(request.path):
        return None
    raw = request.raw_path
    if raw.startswith("/"):
        return raw
    parts = urlsplit(raw)
    if not parts.scheme or not parts.path.startswith("/"):
        return None
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _refused_early(problem: Problem, request_id: str, entry: Entry) -> web.Response:
    """A refusal before any store call (bad input): counted, never charged."""
    metrics.INVALID_REQUESTS.labels(problem.type_suffix).inc()
    entry.decision = problem.type_suffix
    return problem.response(request_id=request_id)


async def handle(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    entry = Entry(method=request.method, path=request.path)
    started = time.perf_counter()
    response: web.StreamResponse | None = None
    try:
        response = await _handle(request, state, entry)
        return response
    finally:
        _done(state, entry, response, started)


#: Labelled children of the request metrics, bound once per label set (bounded: kinds x
#: status classes x decision words).
_REQUEST_COUNTERS: dict[tuple[str, str, str], Any] = {}
_LATENCIES: dict[str, tuple[Any, Any]] = {}


def _done(state: GatewayState, entry: Entry, response: web.StreamResponse | None,
          started: float) -> None:
    """A request ended: its metrics, and its access-log line (499: the client went away
    first)."""
    if response is None:
        entry.status = 499
    else:
        entry.status = response.status
        body = getattr(response, "body", None)
        entry.bytes = len(body) if isinstance(body, bytes) else response.body_length
        if entry.upstream_ms is not None or entry.decision == "off":
            entry.upstream_status = response.status
    if not entry.decision:
        entry.decision = "admitted" if response is not None and response.status < 400 else ""
    kind = entry.kind or "none"
    labels = (kind, f"{entry.status // 100}xx", entry.decision or "none")
    counter = _REQUEST_COUNTERS.get(labels)
    if counter is None:
        counter = _REQUEST_COUNTERS[labels] = metrics.REQUESTS.labels(*labels)
    counter.inc()
    latencies = _LATENCIES.get(kind)
    if latencies is None:
        latencies = _LATENCIES[kind] = (metrics.REQUEST_SECONDS.labels(kind),
                                        metrics.UPSTREAM_SECONDS.labels(kind))
    latencies[0].observe(time.perf_counter() - started)
    if entry.upstream_ms is not None:
        latencies[1].observe(entry.upstream_ms / 1000)
    if state.access_log is not None:
        state.access_log.write(entry, started)


async def _handle(request: web.Request, state: GatewayState, entry: Entry
                  ) -> web.StreamResponse:
    gw = state.config.gateway
    request_id = entry.request_id = request_id_of(request.headers)
    try:
        env = environment_of(request, state.env_suffixes)
    except Problem as problem:
        return _refused_early(problem, request_id, entry)
    path_qs: str | None = request.raw_path
    if not request.raw_path.startswith("/") or "/." in request.path:
        path_qs = _origin_form(request)
    if path_qs is None:
        return _refused_early(invalid_path(request.raw_path[:200], env or ""), request_id,
                              entry)
    entry.env = env
    route = state.router.match(request.path, request.method, request.headers.get("Accept", ""))
    if route is not None:
        entry.route, entry.kind = route.route.name or route.route.prefix, route.kind
    if route is not None and route.kind == "realtime":
        if request.headers.get("Upgrade", "").lower() == "websocket":
            assert state.upgrade is not None  # (the composition, app.init_app, sets it)
            return await state.upgrade(request, state, route, env, path_qs, request_id)
        # Never proxied (nor counted) as realtime: RFC 9110 §15.5.22 names the upgrade.
        metrics.INVALID_REQUESTS.labels("websocket-required").inc()
        entry.decision = "websocket-required"
        return websocket_required(env).response(
            {"Upgrade": "websocket", "Connection": "Upgrade"}, request_id)
    body: bytes | AsyncIterable[bytes] | None = None
    function = ""
    # A CORS preflight costs no call unless its route says so; it is still decided (QPS, the
    # environment's lifecycle), and what it runs is metered (a function's slot and GBs).
    preflight = (route is not None and request.method == "OPTIONS"
                 and route.route.preflight == "free"
                 and is_preflight(request.headers, request.body_exists))
    # Passes, at no cost, while the environment is isolated (the store decides): an action
    # the route lists in pass_while_isolated, and that route's free preflights (a browser
    # sends the action only after its preflight passed).
    while_isolated = False
    if preflight and route is not None and route.actions is not None:
        route = route.actions["auth"]  # no body to name an action yet: counted as nothing
        while_isolated = bool(route.route.pass_while_isolated)
    if route is not None and route.actions is not None:
        try:  # the operation is in the body: read, classify, and check its env
            action = await _read_in_time(read_action(request, route, env), gw, env)
        except Problem as problem:
            return _refused_early(problem, request_id, entry)
        route, body, env, function = action.route, action.body, action.env, action.function
        entry.env, entry.kind = env, route.kind
        while_isolated = action.while_isolated
    elif route is not None and route.kind == "function":
        function = route.function_name(request.path) or ""
    if env is None:
        return _refused_early(missing_environment(state.env_suffixes), request_id, entry)
    if route is None:
        return _refused_early(route_not_found(request.path, env), request_id, entry)

    extra: dict[str, str] = {}
    mode = state.env_modes.get(env, gw.enforcement)
    if mode == "off":
        _OFF.inc()
        entry.decision = "off"
        return await state.pool.forward(request, route, env, path_qs, request_id, extra,
                                        body=body)

    slot = ""
    if route.kind == "function" and route.route.concurrency:
        if not function:
            return _refused_early(invalid_function(request.path, env), request_id, entry)
        slot = "fn:" + function
    needs = route.needs_write if request.method in WRITE_METHODS else route.needs
    cost = 0 if preflight else route.cost
    #: A stream's extra cost: charged after a stream nobody asked for (``after``), or
    #: charged up front when the intent could not be read and given back after a response
    #: that is no stream (``back``).
    after = back = 0
    if route.stream_extra and not preflight:
        intent: bool | None = streams.asks_by_headers(request.headers, request.query) or None
        if intent is None and request.body_exists and body is None:
            try:
                prefix, whole = await _read_in_time(
                    streams.read_prefix(request, route.route.stream_probe_bytes), gw, env)
            except Problem as problem:
                return _refused_early(problem, request_id, entry)
            if whole and streams.readable(request):
                intent = streams.asks_by_body(prefix)
                body = prefix
            else:
                body = prefix if whole else streams.rest_of_body(prefix, request)
        elif intent is None:
            intent = False  # no body: its headers said all
        if intent is None:  # unreadable intent: a stream's price, the rest back after
            cost, back = cost + route.stream_extra, route.stream_extra
        elif intent:
            cost += route.stream_extra
        else:
            after = route.stream_extra
    decided_at = state.limiter.clock.now_ms()
    # A hot environment's request is decided in memory, without a coroutine or the store.
    in_memory = not slot and not while_isolated
    decision: Decision | Problem | None = (
        decided_now(state.limiter, env, route.kind, cost, needs) if in_memory else None)
    if decision is None:
        decision = await decide(state.limiter, env, route.kind, cost, slot, needs,
                                while_isolated=while_isolated, in_memory=False)
    if isinstance(decision, Problem):
        entry.decision = decision.type_suffix
        return decision.response(request_id=request_id)
    if not decision.admitted:
        if (decision.outcome is Outcome.ISOLATED and route.kind == "function"
                and request.headers.get("X-Invocation-Type", "").lower() == "event"):
            try:
                queued: bytes | None = await _read_in_time(
                    _whole(request, body, QUEUE_MAX_BODY), gw, env)
            except Problem as problem:
                return _refused_early(problem, request_id, entry)
            entry.decision = "queued"
            return await _queue_invocation(state, request, env, path_qs, queued)
        refused = refusal(decision, env)
        entry.decision = refused.type_suffix
        # Logged once: in the access log when it is on (this line then only at DEBUG).
        level = logging.DEBUG if state.access_log is not None else logging.INFO
        name = route.route.name or route.route.prefix
        decisions_log.log(level, "refused %s %s: %s", env, name, refused.type_suffix, extra={
            "env": env, "route": name, "meter": refused.meter, "reason": refused.type_suffix,
            "status": refused.status, "request_id": request_id})
        return refused.response(ratelimit_headers(decision), request_id)
    if decisions_log.isEnabledFor(logging.DEBUG):
        decisions_log.debug("admitted %s %s", env, route.route.name or route.route.prefix,
                            extra={"env": env, "route": route.route.name or route.route.prefix,
                                   "reason": "bypassed" if decision.store_bypassed else
                                   "shadow" if decision.flags & Flag.SHADOW_REFUSAL else
                                   "passed-isolated" if decision.flags & Flag.WHILE_ISOLATED
                                   else "admitted", "request_id": request_id})
    if decision.store_bypassed:
        extra["X-Quotagate-Bypass"] = "store-unavailable"
        entry.decision = "bypassed"
    elif decision.flags & Flag.SHADOW_REFUSAL:
        extra["X-Quotagate-Shadow"] = "would-refuse"
        entry.decision = "shadow-refused"
    elif decision.flags & Flag.WHILE_ISOLATED:
        entry.decision = "passed-isolated"  # at no cost: the SDK learns the state from it
    else:
        entry.decision = "admitted"
    extra.update(ratelimit_headers(decision))
    holds = decision.slot_held
    tally = Tally()
    if holds:
        metrics.FUNCTION_SLOTS.inc()
    bandwidth = state.limiter.bandwidth
    rate = bandwidth.rate_of(env, decision.bandwidth, decision.store_bypassed)
    try:
        if rate:  # the gateway version's bandwidth: the response is shaped to it
            async with bandwidth.shaping(env, rate) as pacer:
                return await state.pool.forward(request, route, env, path_qs, request_id,
                                                extra, tally, body, pacer)
        return await state.pool.forward(request, route, env, path_qs, request_id, extra,
                                        tally, body)
    finally:
        if tally.answered:
            entry.upstream_ms = tally.run_ms
        # Also when the client went away or the upstream failed: never a leaked slot.
        if holds:
            state.limiter.release(env, slot)
            metrics.FUNCTION_SLOTS.dec()
        # (The common case, an answered call with nothing metered, makes no call here.)
        if (route.meter or after or back or not tally.answered) and not (
                decision.flags & Flag.MODE_OFF):
            _charge_after(state, env, route, function, cost, after, back, decided_at,
                          decision, tally)


def _charge_after(state: GatewayState, env: str, route: CompiledRoute, function: str,
                  cost: int, after: int, back: int, decided_at: int, decision: Decision,
                  tally: Tally) -> None:
    """What the response decides: the route's meter (GBs for the time the request was with
    the upstream); a call the upstream never answered (the gateway's own 502 or 504) given
    back; a stream's extra cost charged after a stream nobody asked for, or given back after
    a response that is none."""
    if route.meter:
        if route.meter == "gbs":
            amount = state.memory_mb(env, function, route) * tally.run_ms
        else:
            amount = tally.body_bytes
        state.limiter.meter(env, route.meter, amount)
    charged = decision.charged_calls(route.kind)  # only that may go back
    if not tally.answered:
        if charged and cost:
            state.limiter.refund(env, "calls", cost, decided_at)
            metrics.REFUNDS.inc()
        return
    if after and tally.streamed:
        state.limiter.meter(env, "calls", after)
        metrics.STREAMS_CHARGED_AFTER.inc()
    elif back and not tally.streamed and charged:
        state.limiter.refund(env, "calls", back, decided_at)


async def _read_in_time(read: Awaitable[Any], gw: Any, env: str | None) -> Any:
    """A body the gateway reads before deciding must come within ``clients.body_timeout_ms``
    (a client that trickles it would hold the handler for ever): else 408."""
    try:
        async with asyncio.timeout(gw.clients.body_timeout_ms / 1000):
            return await read
    except TimeoutError:
        raise request_timeout(gw.clients.body_timeout_ms, env) from None


#: The request headers a queued invocation keeps (it waits in the store up to 7 days):
#: what the function needs to read its body and trace it, never credentials (Authorization,
#: cookies, signatures), which would sit there at rest.
QUEUED_HEADERS = frozenset({"content-type", "content-encoding", "x-invocation-type",
                            "x-request-id", "user-agent", "accept", "traceparent",
                            "tracestate"})


async def _whole(request: web.Request, body: bytes | AsyncIterable[bytes] | None,
                 limit: int) -> bytes | None:
    """The whole body (what was read of it already, and the rest), None if over ``limit``."""
    if body is None:
        return await read_body(request, limit)
    if isinstance(body, bytes):
        return body if len(body) <= limit else None
    chunks: list[bytes] = []
    size = 0
    async for chunk in body:
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None
    return b"".join(chunks)


async def _queue_invocation(state: GatewayState, request: web.Request, env: str,
                            path_qs: str, body: bytes | None) -> web.Response:
    """An asynchronous invocation while isolated: queued durably, replayed on renewal.
    ``body``: the whole body, None when it is over QUEUE_MAX_BODY."""
    if body is None:
        return body_too_large(QUEUE_MAX_BODY, env, "an invocation queued while the "
                              "environment is isolated").response()
    headers = {k: v for k, v in request.headers.items() if k.lower() in QUEUED_HEADERS}
    try:
        length = await enqueue(state.redis, env, request.method, path_qs, headers, body,
                               state.limiter.clock.now_ms())
    except (aredis.RedisError, OSError) as exc:
        log.error("could not queue an invocation of %s: %s", env, exc)
        return store_unavailable(env).response()
    if length < 0:
        metrics.QUEUED_INVOCATIONS.labels("refused").inc()
        return queue_full(env).response()
    metrics.DECISIONS.labels("queued", "environment-isolated").inc()
    metrics.QUEUED_INVOCATIONS.labels("queued").inc()
    return web.json_response({"queued": True, "env": env, "queue_length": length,
                              "detail": "the environment is isolated: the invocation runs "
                                        "when it is renewed (within 7 days)"}, status=202)

