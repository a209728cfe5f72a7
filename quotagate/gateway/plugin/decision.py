"""Plugin mode's one decision: a request a proxy describes (nginx ``auth_request``, Traefik
ForwardAuth, Envoy ``ext_authz`` or its rate limit service) decided as quotagate's own proxy
decides it — environment, route, function slot, stream price, one ``decide`` — and, when the
response must be finished, a signed ticket (tickets.py) for the proxy's done call (done.py).

What differs from the proxy, because the proxy moves the bytes:

- a function slot is held by the request itself (a holder id with the route's
  ``max_duration_ms`` lease), not by this instance: any instance can give it back when the
  done call comes, and without one it ends with its lease;
- what is metered after the response (GBs, bytes; a stream's difference; a call the upstream
  never answered given back) comes from the done call's figures;
- realtime routes, and action routes whose body the proxy does not send, are refused with
  ``proxy-required``: they need quotagate's own listener.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy
from yarl import URL

from quotagate.common import metrics
from quotagate.gateway import streams
from quotagate.gateway.actions import classify_action
from quotagate.gateway.decisions import decide, decided_now
from quotagate.gateway.envid import environment_from, missing_environment
from quotagate.gateway.headers import ratelimit_headers, request_id
from quotagate.gateway.plugin.tickets import DECISION_HEADER, TICKET_GRACE_MS, Ticket, Tickets
from quotagate.gateway.problems import (
    Problem,
    body_too_large,
    invalid_function,
    invalid_path,
    proxy_required,
    refusal,
    route_not_found,
)
from quotagate.gateway.routing import DOT_SEGMENT, WRITE_METHODS, CompiledRoute, is_preflight
from quotagate.gateway.state import GatewayState
from quotagate.limiter.codes import Flag
from quotagate.limiter.decision import Decision

_NO_QUERY: MultiDictProxy[str] = MultiDictProxy(MultiDict())


@dataclass(frozen=True, slots=True)
class Described:
    """A request as a proxy describes it."""

    method: str
    #: The request target as the client sent it (origin form: path and query).
    target: str
    host: str
    headers: CIMultiDictProxy[str] | CIMultiDict[str]
    #: The body when the proxy sends it (Envoy ``with_request_body``, Traefik
    #: ``forwardBody``); None when it does not.
    body: bytes | None = None
    #: The route's cost is multiplied by this (Envoy's ``hits_addend``).
    cost_factor: int = 1
    #: Whether the request has a body: True / False when the proxy says (nginx's
    #: X-Original-Content-Length, Envoy's buffered body), None when it cannot be known — a
    #: preflight is then charged, never assumed free.
    has_body: bool | None = None


@dataclass(slots=True)
class Verdict:
    """The answer: ``problem`` None when admitted; ``headers`` for the client (RateLimit,
    Retry-After) and, when the request must be finished, the ticket."""

    request_id: str
    env: str | None = None
    problem: Problem | None = None
    decision: Decision | None = None
    headers: dict[str, str] = field(default_factory=dict)
    ticket: str = ""


def _refused_early(verdict: Verdict, problem: Problem) -> Verdict:
    metrics.INVALID_REQUESTS.labels(problem.type_suffix).inc()
    verdict.problem = problem
    return verdict


async def decide_described(state: GatewayState, tickets: Tickets, req: Described) -> Verdict:
    verdict = Verdict(request_id(req.headers))
    raw, _, query_string = req.target.partition("?")
    query: MultiDictProxy[str] | MultiDict[str] = _NO_QUERY
    try:
        # Routed by the decoded path, as the proxy routes it (yarl only when there is
        # something to decode: the common path costs nothing).
        path = URL.build(path=raw, encoded=True).path if "%" in raw else raw
        if query_string:
            query = URL("/?" + query_string, encoded=True).query
    except ValueError:
        return _refused_early(verdict, invalid_path(req.target[:200], ""))
    try:
        env = environment_from(req.host, query_string, query, req.headers,
                               state.env_suffixes)
    except Problem as problem:
        return _refused_early(verdict, problem)
    verdict.env = env
    if DOT_SEGMENT.search(path) or not req.target.startswith("/"):
        return _refused_early(verdict, invalid_path(req.target[:200], env or ""))
    route = state.router.match(path, req.method, req.headers.get("Accept", ""))
    if route is not None and route.kind == "realtime":
        return _refused_early(verdict, proxy_required(
            env, "a realtime route's watches are counted in its WebSocket frames"))
    function = ""
    preflight = (route is not None and req.method == "OPTIONS"
                 and route.route.preflight == "free" and req.has_body is False
                 and is_preflight(req.headers, bool(
                     req.headers.get("Content-Length", "0").strip("0"))))
    while_isolated = False  # passes at no cost while isolated (as the proxy decides it)
    if preflight and route is not None and route.actions is not None:
        route = route.actions["auth"]
        while_isolated = bool(route.route.pass_while_isolated)
    if route is not None and route.actions is not None:
        if req.body is None:
            return _refused_early(verdict, proxy_required(
                env, "an action route is counted by its body's action, and this proxy does "
                "not send the body"))
        if len(req.body) > route.route.max_body_bytes:
            return _refused_early(verdict, body_too_large(route.route.max_body_bytes, env))
        try:
            action = classify_action(route, req.body,
                                     req.headers.get("Content-Encoding", ""), env)
        except Problem as problem:
            return _refused_early(verdict, problem)
        route, env, function = action.route, action.env, action.function
        while_isolated = action.while_isolated
        verdict.env = env
    elif route is not None and route.kind == "function":
        function = route.function_name(path) or ""
    if env is None:
        return _refused_early(verdict, missing_environment(state.env_suffixes))
    if route is None:
        return _refused_early(verdict, route_not_found(path, env))
    intent: bool | None = None
    if route.stream_extra and not preflight:
        intent = streams.asks_by_headers(req.headers, query) or None
        if intent is None and req.body:
            intent = streams.asks_by_body(req.body[:route.route.stream_probe_bytes])
    return await decide_on_route(state, tickets, verdict, env, route, function,
                                 req.method, 0 if preflight else route.cost * req.cost_factor,
                                 path=path, intent=intent, preflight=preflight,
                                 while_isolated=while_isolated)


async def decide_on_route(state: GatewayState, tickets: Tickets, verdict: Verdict, env: str,
                          route: CompiledRoute, function: str, method: str, cost: int, *,
                          path: str = "", intent: bool | None = None,
                          preflight: bool = False, while_isolated: bool = False) -> Verdict:
    """The decision of a request of ``route`` at ``cost`` (its slot leased to the request
    itself, its stream price by ``intent``: None when it could not be read;
    ``while_isolated``: it passes, at no cost, while the environment is isolated)."""
    verdict.env = env
    gw = state.config.gateway
    if state.env_modes.get(env, gw.enforcement) == "off":
        metrics.DECISIONS.labels("off", "").inc()
        return verdict
    slot = ""
    if route.kind == "function" and route.route.concurrency:
        if not function:
            return _refused_early(verdict, invalid_function(path or route.route.prefix, env))
        slot = "fn:" + function
    needs = route.needs_write if method in WRITE_METHODS else route.needs
    after = back = 0
    if route.stream_extra and not preflight:
        if intent is None:
            # Not readable here (no body sent, or not JSON): a stream's price, as the proxy
            # decides an unreadable intent; the difference goes back when the done call
            # reports an answer that was no stream (without a done call it stays charged).
            cost, back = cost + route.stream_extra, route.stream_extra
        elif intent:
            cost += route.stream_extra
        else:
            after = route.stream_extra
    holder = "p:" + secrets.token_hex(8) if (slot or route.meter or after or back) else ""
    decided_at = state.limiter.clock.now_ms()
    # A hot environment's request is decided in memory, without a coroutine or the store.
    decision: Decision | Problem | None = (
        decided_now(state.limiter, env, route.kind, cost, needs)
        if not slot and not while_isolated else None)
    if decision is None:
        decision = await decide(state.limiter, env, route.kind, cost, slot, needs, holder,
                                route.route.max_duration_ms, while_isolated, in_memory=False)
    if isinstance(decision, Problem):
        verdict.problem = decision
        return verdict
    verdict.decision = decision
    verdict.headers.update(ratelimit_headers(decision))
    if not decision.admitted:
        verdict.problem = refusal(decision, env)
        return verdict
    if decision.store_bypassed:
        verdict.headers["X-Quotagate-Bypass"] = "store-unavailable"
    elif decision.flags & Flag.SHADOW_REFUSAL:
        verdict.headers["X-Quotagate-Shadow"] = "would-refuse"
    if holder and not decision.flags & Flag.MODE_OFF:
        memory = state.memory_mb(env, function, route) if route.meter == "gbs" else 0
        # The slot whenever one was asked for: a decision that timed out and ran late may
        # hold it (giving back what is not held changes nothing).
        verdict.ticket = tickets.sign(Ticket(
            env, holder, slot, route.meter or "", memory, cost, after, back, decided_at,
            decision.charged_calls(route.kind),
            decided_at + route.route.max_duration_ms + TICKET_GRACE_MS))
        verdict.headers[DECISION_HEADER] = verdict.ticket
    return verdict
