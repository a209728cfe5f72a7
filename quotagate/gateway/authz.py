"""Plugin mode's HTTP front door (``authz_listen``): the decision service of the proxies
platforms already run, and the done endpoint they call after each response.

- ``/authz/nginx`` — nginx ``auth_request``: the original request from ``X-Original-Method``,
  ``X-Original-URI`` and ``Host``. nginx lets only 2xx, 401 and 403 through an auth
  subrequest, so a refusal is a 403 carrying the real status (``X-Quotagate-Status``) and the
  problem body (``X-Quotagate-Problem``), which ``deploy/nginx/quotagate.conf`` sends on.
- ``/authz/forward`` — Traefik ForwardAuth: ``X-Forwarded-Method``, ``X-Forwarded-Uri``,
  ``X-Forwarded-Host`` (and the body with ``forwardBody``). A refusal is the answer itself.
- ``/authz/envoy/<path>`` — Envoy ``ext_authz`` HTTP service with ``path_prefix:
  /authz/envoy``: the original method, path, ``Host`` (and body with ``with_request_body``).
  A refusal is the answer itself.
- ``POST /authz/v1/done`` — after the response: ``decision`` (the ``X-Quotagate-Decision``
  ticket), ``answered``, ``duration_ms``, ``bytes``, ``stream``, as query parameters or a JSON
  object. Gives the request's function slot back and meters what it ran, once.

An admitted request is answered 200 (nginx: 204) with the RateLimit headers and, when it must
be finished, the ticket.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from quotagate.common import metrics
from quotagate.gateway.plugin import (
    DECISION_HEADER,
    Described,
    Done,
    Tickets,
    Verdict,
    decide_described,
    finish,
)
from quotagate.gateway.problems import Problem, invalid_decision, store_unavailable
from quotagate.gateway.state import GatewayState
from quotagate.limiter.errors import StoreError

AUTHZ_STATE = web.AppKey("authz_state", GatewayState)
TICKETS = web.AppKey("authz_tickets", Tickets)
#: The largest body a proxy may send along (Envoy with_request_body, Traefik forwardBody).
MAX_BODY = 64 * 1024 * 1024
#: Values of the done call's figures: non-negative, exact in the store.
MAX_FIGURE = 2**53 - 1


def _problem_header(problem: Problem, request_id: str) -> str:
    """The problem body, on one line, for a header (nginx cannot pass an auth body on)."""
    body = problem.response(request_id=request_id).body
    assert isinstance(body, bytes)
    return json.dumps(json.loads(body), ensure_ascii=True, separators=(",", ":"))


def _headers(verdict: Verdict) -> dict[str, str]:
    headers = dict(verdict.headers)
    headers["X-Request-Id"] = verdict.request_id
    return headers


async def nginx(request: web.Request) -> web.Response:
    """nginx ``auth_request``: 204 admitted; 403 refused (the real status and problem in
    headers)."""
    h = request.headers
    verdict = await decide_described(request.app[AUTHZ_STATE], request.app[TICKETS], Described(
        h.get("X-Original-Method", "GET"), h.get("X-Original-URI", "/"), request.host,
        h))
    headers = _headers(verdict)
    problem = verdict.problem
    if problem is None:
        return web.Response(status=204, headers=headers)
    headers["X-Quotagate-Status"] = str(problem.status)
    headers["X-Quotagate-Problem"] = _problem_header(problem, verdict.request_id)
    if problem.retry_after_s is not None:
        headers["Retry-After"] = str(problem.retry_after_s)
    return web.Response(status=403, headers=headers)


async def _body(request: web.Request) -> bytes | None:
    if not request.body_exists:
        return None
    return await request.read()


async def _answer(request: web.Request, described: Described) -> web.Response:
    verdict = await decide_described(request.app[AUTHZ_STATE], request.app[TICKETS], described)
    headers = _headers(verdict)
    if verdict.problem is None:
        return web.Response(status=200, headers=headers)
    return verdict.problem.response(headers, verdict.request_id)


async def forward_auth(request: web.Request) -> web.Response:
    """Traefik ForwardAuth: 200 admitted; the refusal itself otherwise."""
    h = request.headers
    return await _answer(request, Described(
        h.get("X-Forwarded-Method", request.method), h.get("X-Forwarded-Uri", "/"),
        h.get("X-Forwarded-Host", request.host), h, await _body(request)))


ENVOY_PREFIX = "/authz/envoy"


async def envoy(request: web.Request) -> web.Response:
    """Envoy ``ext_authz`` (HTTP service, ``path_prefix: /authz/envoy``)."""
    target = request.raw_path[len(ENVOY_PREFIX):] or "/"
    return await _answer(request, Described(request.method, target, request.host,
                                            request.headers, await _body(request)))


def _figure(params: dict[str, Any], name: str) -> int:
    value = params.get(name, 0)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise invalid_decision(f"{name} must be a whole number, not {str(value)[:40]!r}"
                               ) from None
    if isinstance(value, bool) or not 0 <= number <= MAX_FIGURE:
        raise invalid_decision(f"{name} must be a whole number from 0 to {MAX_FIGURE}")
    return number


def _flag(params: dict[str, Any], name: str, default: bool) -> bool:
    value = params.get(name, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise invalid_decision(f"{name} must be 1 or 0, not {text[:40]!r}")


async def done(request: web.Request) -> web.Response:
    """The proxy's call after the response: 204 once finished (or kept for write-back)."""
    params: dict[str, Any] = dict(request.query)
    try:
        if request.body_exists:
            try:
                body = json.loads(await request.read())
            except ValueError:
                raise invalid_decision("the body must be a JSON object (or send the "
                                       "figures as query parameters)") from None
            if not isinstance(body, dict):
                raise invalid_decision("the body must be a JSON object")
            params.update(body)
        token = params.get("decision")
        if not isinstance(token, str) or not token:
            raise invalid_decision(f"no decision: send the {DECISION_HEADER} header's value "
                                   "as decision")
        ticket = request.app[TICKETS].open(token)
        figures = Done(_flag(params, "answered", True), _figure(params, "duration_ms"),
                       _figure(params, "bytes"), _flag(params, "stream", False))
    except Problem as problem:
        metrics.DONE_CALLS.labels("invalid").inc()
        return problem.response()
    try:
        await finish(request.app[AUTHZ_STATE], ticket, figures)
    except StoreError:
        metrics.DONE_CALLS.labels("unavailable").inc()
        return store_unavailable(ticket.env).response()
    metrics.DONE_CALLS.labels("done").inc()
    return web.Response(status=204)


def init_authz_app(state: GatewayState, tickets: Tickets | None = None) -> web.Application:
    """The decision listener's application, on the same state as the proxy's."""
    app = web.Application(client_max_size=MAX_BODY)
    app[AUTHZ_STATE] = state
    app[TICKETS] = tickets or Tickets()
    app.router.add_route("*", "/authz/nginx", nginx)
    app.router.add_route("*", "/authz/forward", forward_auth)
    app.router.add_route("*", ENVOY_PREFIX + "/{tail:.*}", envoy)
    app.router.add_post("/authz/v1/done", done)
    return app

