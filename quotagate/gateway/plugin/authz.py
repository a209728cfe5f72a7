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
  ticket), ``answered``, ``duration_ms``, ``bytes``, ``stream`` or ``content_type``, as query
  parameters or a JSON object. Gives the request's function slot back and meters what it ran,
  once: the first done call the store takes for a ticket decides, whatever it carries (later
  ones change nothing); figures out of bounds are refused (400) before anything is written.

An admitted request is answered 200 (nginx: 204) with the RateLimit headers and, when it must
be finished, the ticket.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from quotagate.common import metrics
from quotagate.common.server import SERVER
from quotagate.gateway.plugin.decision import Described, Verdict, decide_described
from quotagate.gateway.plugin.done import MAX_AMOUNT, Done, finish
from quotagate.gateway.plugin.tickets import DECISION_HEADER, Tickets
from quotagate.gateway.problems import Problem, invalid_decision
from quotagate.gateway.state import GatewayState
from quotagate.gateway.streams import is_stream_type
from quotagate.limiter.calls import SettleRefused
from quotagate.limiter.errors import StoreError

log = logging.getLogger("quotagate.gateway")

#: The largest body a proxy may send along (Envoy with_request_body, Traefik forwardBody).
MAX_BODY = 64 * 1024 * 1024
#: Values of the done call's figures: non-negative, exact in the store (what they meter is
#: bounded too: done.settlement).
MAX_FIGURE = MAX_AMOUNT
ENVOY_PREFIX = "/authz/envoy"


def _problem_header(problem: Problem, request_id: str) -> str:
    """The problem body, on one line, for a header (nginx cannot pass an auth body on)."""
    body = problem.response(request_id=request_id).body
    assert isinstance(body, bytes)
    return json.dumps(json.loads(body), ensure_ascii=True, separators=(",", ":"))


def _headers(verdict: Verdict) -> dict[str, str]:
    headers = verdict.headers
    headers["X-Request-Id"] = verdict.request_id
    return headers


async def _body(request: web.BaseRequest) -> bytes | None:
    if not request.body_exists:
        return None
    return await request.read()


def _nginx_has_body(described: str | None) -> bool | None:
    """``X-Original-Body: length=$content_length;te=$http_transfer_encoding`` (the shipped
    nginx conf): whether the request has a body; None when the header is not there."""
    if described is None:
        return None
    fields = dict(part.partition("=")[::2] for part in described.split(";"))
    return fields.get("length", "") not in ("", "0") or bool(fields.get("te", ""))


def _figure(params: dict[str, Any], name: str) -> int:
    value = params.get(name, 0)
    try:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        number = int(value)
    except (TypeError, ValueError, OverflowError):
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


class AuthzService:
    """The decision listener's handler, on the same state as the proxy's. Served by aiohttp's
    low-level server (no application router: four paths, dispatched here, cost a fifth less
    per decision)."""

    def __init__(self, state: GatewayState, tickets: Tickets | None = None):
        self.state = state
        self.tickets = tickets or Tickets()

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        response = await self._dispatch(request)
        response.headers.setdefault("Server", SERVER)  # (no signals on the low-level server)
        return response

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        # (the raw target: decoding it into a URL costs more than the decision's own Python)
        path = request.raw_path.partition("?")[0]
        if path == "/authz/nginx":
            return await self.nginx(request)
        if path == "/authz/forward":
            return await self.forward_auth(request)
        if path.startswith(ENVOY_PREFIX + "/") or path == ENVOY_PREFIX:
            return await self.envoy(request)
        if path == "/authz/v1/done":
            if request.method != "POST":
                return web.Response(status=405, headers={"Allow": "POST"})
            return await self.done(request)
        return web.Response(status=404, text="not a decision endpoint: /authz/nginx, "
                            "/authz/forward, /authz/envoy/<path>, POST /authz/v1/done\n")

    async def nginx(self, request: web.BaseRequest) -> web.Response:
        """nginx ``auth_request``: 204 admitted; 403 refused (the real status and problem in
        headers)."""
        h = request.headers
        verdict = await decide_described(self.state, self.tickets, Described(
            h.get("X-Original-Method", "GET"), h.get("X-Original-URI", "/"), request.host,
            h, has_body=_nginx_has_body(h.get("X-Original-Body"))))
        headers = _headers(verdict)
        problem = verdict.problem
        if problem is None:
            return web.Response(status=204, headers=headers)
        headers["X-Quotagate-Status"] = str(problem.status)
        headers["X-Quotagate-Problem"] = _problem_header(problem, verdict.request_id)
        if problem.retry_after_s is not None:
            headers["Retry-After"] = str(problem.retry_after_s)
        return web.Response(status=403, headers=headers)

    async def _answer(self, described: Described) -> web.Response:
        verdict = await decide_described(self.state, self.tickets, described)
        headers = _headers(verdict)
        if verdict.problem is None:
            return web.Response(status=200, headers=headers)
        return verdict.problem.response(headers, verdict.request_id)

    async def forward_auth(self, request: web.BaseRequest) -> web.Response:
        """Traefik ForwardAuth: 200 admitted; the refusal itself otherwise."""
        h = request.headers
        body = await _body(request)
        return await self._answer(Described(
            h.get("X-Forwarded-Method", request.method), h.get("X-Forwarded-Uri", "/"),
            h.get("X-Forwarded-Host", request.host), h, body,
            has_body=True if body else None))

    async def envoy(self, request: web.BaseRequest) -> web.Response:
        """Envoy ``ext_authz`` (HTTP service, ``path_prefix: /authz/envoy``)."""
        target = request.raw_path[len(ENVOY_PREFIX):] or "/"
        body = await _body(request)
        # Envoy marks a check request that carries the buffered body (with_request_body).
        buffered = "x-envoy-auth-partial-body" in request.headers
        return await self._answer(Described(
            request.method, target, request.host, request.headers, body,
            has_body=bool(body) if buffered else (True if body else None)))

    async def done(self, request: web.BaseRequest) -> web.Response:
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
                raise invalid_decision(f"no decision: send the {DECISION_HEADER} header's "
                                       "value as decision")
            ticket = self.tickets.open(token)
            if self.state.limiter.clock.now_ms() > ticket.expires_at:
                raise invalid_decision("the decision token has expired (a done call comes "
                                       "within the route's max_duration_ms and an hour)")
            content_type = params.get("content_type")
            stream = (is_stream_type(content_type) if isinstance(content_type, str)
                      else _flag(params, "stream", False))
            figures = Done(_flag(params, "answered", True), _figure(params, "duration_ms"),
                           _figure(params, "bytes"), stream)
        except Problem as problem:
            metrics.DONE_CALLS.labels("invalid").inc()
            return problem.response()
        try:
            await finish(self.state, ticket, figures)
        except Problem as problem:  # an amount out of bounds: nothing was sent
            metrics.DONE_CALLS.labels("invalid").inc()
            return problem.response()
        except SettleRefused:  # out of the store's bounds (logged): nothing was written
            metrics.DONE_CALLS.labels("invalid").inc()
            return invalid_decision(
                "the store refused these figures whole (an amount beyond "
                f"{MAX_FIGURE}, or a count of {ticket.env} that would overflow): nothing was "
                "changed").response()
        except StoreError as exc:
            log.error("done call of %s (%s) not taken by the store: %s", ticket.env,
                      ticket.holder, exc)
            metrics.DONE_CALLS.labels("unavailable").inc()
            return Problem(503, "store-unavailable", "Quota store unavailable",
                           f"the quota store did not take the done call ({str(exc)[:200]}); "
                           "send it again: a decision's done call counts once", ticket.env,
                           retry_after_s=1).response()
        metrics.DONE_CALLS.labels("done").inc()
        return web.Response(status=204)


def authz_server(state: GatewayState, tickets: Tickets | None = None) -> web.Server:
    """The decision listener's server (``web.ServerRunner(authz_server(...))``), bounded as
    the public listener is (gateway.yaml ``clients``): a request head within
    ``header_timeout_ms`` of the connection's start or of its previous response, a body within
    ``body_timeout_ms`` (else 408 and the connection closed); its connection cap is
    gateway/server.py's."""
    from quotagate.gateway.clients import server_kwargs
    from quotagate.gateway.problems import request_timeout

    service = AuthzService(state, tickets)

    async def bounded(request: web.BaseRequest) -> web.StreamResponse:
        # A body still coming is read here, in time (the service's read then has it at once):
        # one trickled would hold the handler, and its connection, for ever.
        if request.body_exists and not request.content.is_eof():
            limit_ms = state.config.gateway.clients.body_timeout_ms
            try:
                async with asyncio.timeout(limit_ms / 1000):
                    await request.read()
            except TimeoutError:
                response = request_timeout(limit_ms, None).response()
                response.headers["Server"] = SERVER
                response.force_close()
                return response
        return await service(request)

    def request_factory(message: Any, payload: Any, protocol: Any, writer: Any,
                        task: Any) -> web.BaseRequest:
        return web.BaseRequest(message, payload, protocol, writer, task,
                               asyncio.get_running_loop(), client_max_size=MAX_BODY)

    # A request head as long as nginx's (large_client_header_buffers) is still described.
    return web.Server(bounded, request_factory=request_factory, access_log=None,
                      max_line_size=32768, max_field_size=32768,
                      **server_kwargs(state.config.gateway.clients))
