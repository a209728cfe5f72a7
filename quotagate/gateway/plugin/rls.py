"""Plugin mode for Envoy's rate limit filter: ``envoy.service.ratelimit.v3.RateLimitService/
ShouldRateLimit`` over gRPC, a drop-in for the envoyproxy/ratelimit service
(``authz.grpc_listen``).

The first descriptor whose entries name a request (an environment, ``authz.ratelimit.
env_key``, or host and path) is its one decision; later ones naming one are answered OK, never
charged twice. It is routed by its path entry as the HTTP front doors route a request (kind,
cost, function slot), or by its kind entry (the route of that kind with the longest prefix),
at the route's cost times ``hits_addend``. Descriptors naming no request are answered OK,
untouched; a refusal makes the overall code OVER_LIMIT, with the problem as the local reply's
body and the RateLimit headers. Nothing calls back after the response: a function slot ends
with the route's ``max_duration_ms`` lease (unless the platform's service sends the done call
with the ``X-Quotagate-Decision`` request header's ticket), and GBs and bytes are not metered.

The stack: grpclib (HTTP/2 gRPC on asyncio, so the service runs on the gateway's own event
loop and shares its limiter and pipelined store connection; grpcio's asyncio server cost more
CPU per decision here), with message classes built at import from Envoy's own protos
(vendored in ``third_party/envoy/``, compiled by ``scripts/protos`` into ``rls.binpb`` beside
this module) by protobuf's upb runtime (parsing and serializing in C: half the CPU per
decision of pure-Python messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from importlib import resources
from typing import Any, cast

import grpclib.const
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol
from grpclib.server import Server, Stream
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError as H2ProtocolError
from multidict import CIMultiDict

from quotagate.common.envids import ENV_ID
from quotagate.gateway.clients import REFUSED_LINGER_S, Listener
from quotagate.gateway.headers import request_id
from quotagate.gateway.plugin.decision import (
    Described,
    Verdict,
    decide_described,
    decide_on_route,
)
from quotagate.gateway.plugin.tickets import Tickets
from quotagate.gateway.problems import invalid_environment, route_not_found
from quotagate.gateway.state import GatewayState
from quotagate.limiter.codes import Outcome

log = logging.getLogger("quotagate.gateway")

UINT32 = 2**32 - 1
METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"


def _messages() -> dict[str, Any]:
    """Envoy's messages, from the descriptor set of its protos (a pool of our own: nothing
    registered globally)."""
    files = descriptor_pb2.FileDescriptorSet.FromString(
        resources.files("quotagate.gateway.plugin").joinpath("rls.binpb").read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    names = {"RateLimitRequest": "envoy.service.ratelimit.v3.RateLimitRequest",
             "RateLimitResponse": "envoy.service.ratelimit.v3.RateLimitResponse"}
    found = {short: message_factory.GetMessageClass(pool.FindMessageTypeByName(full))
             for short, full in names.items()}
    response = pool.FindMessageTypeByName(names["RateLimitResponse"])
    found["OK"] = response.enum_types_by_name["Code"].values_by_name["OK"].number
    found["OVER_LIMIT"] = response.enum_types_by_name["Code"].values_by_name[
        "OVER_LIMIT"].number
    units = response.nested_types_by_name["RateLimit"].enum_types_by_name["Unit"]
    found["SECOND"] = units.values_by_name["SECOND"].number
    found["MONTH"] = units.values_by_name["MONTH"].number
    return found


_M = _messages()
RateLimitRequest = _M["RateLimitRequest"]
RateLimitResponse = _M["RateLimitResponse"]
OK, OVER_LIMIT, SECOND, MONTH = _M["OK"], _M["OVER_LIMIT"], _M["SECOND"], _M["MONTH"]


def _fill_limit(status: Any, verdict: Verdict) -> None:
    """The limit a descriptor's status reports: the one that refused, else the calls quota
    (or QPS when no quota is known); with what is left and how long until it resets."""
    d = verdict.decision
    if d is None or d.qps_limit <= 0:
        return
    limit = status.current_limit
    if d.outcome is Outcome.QPS_EXCEEDED or d.window_s <= 0:
        limit.name, limit.requests_per_unit, limit.unit = "qps", min(d.qps_limit, UINT32), SECOND
        remaining, reset_ms = d.qps_remaining, d.qps_reset_ms
    else:
        limit.name, limit.requests_per_unit = d.meter or "calls", min(d.quota, UINT32)
        limit.unit = MONTH
        remaining, reset_ms = max(0, d.remaining), max(0, d.reset_ms)
    status.limit_remaining = min(remaining, UINT32)
    status.duration_until_reset.FromMilliseconds(reset_ms)


class RateLimitService:
    """``ShouldRateLimit`` (grpclib's handler mapping, Envoy's messages)."""

    def __init__(self, state: GatewayState, tickets: Tickets):
        self.state = state
        self.tickets = tickets

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {METHOD: grpclib.const.Handler(self._rpc, grpclib.const.Cardinality.UNARY_UNARY,
                                              RateLimitRequest, RateLimitResponse)}

    async def _rpc(self, stream: Stream[Any, Any]) -> None:
        # The call's request message comes within clients.header_timeout_ms (a call whose
        # message is trickled, or never sent, would hold its stream, and its connection, for
        # ever).
        limit_ms = self.state.config.gateway.clients.header_timeout_ms
        try:
            async with asyncio.timeout(limit_ms / 1000):
                request = await stream.recv_message()
        except TimeoutError:
            raise GRPCError(Status.DEADLINE_EXCEEDED, f"the request message did not come "
                            f"within {limit_ms} ms (clients.header_timeout_ms)") from None
        assert request is not None
        await stream.send_message(await self.should_rate_limit(request))

    async def _one(self, descriptor: Any, hits: int, rid: str) -> Verdict | None:
        settings = self.state.config.gateway.authz.ratelimit
        entries = {entry.key: entry.value for entry in descriptor.entries}
        env = entries.get(settings.env_key)
        host = entries.get(settings.host_key)
        path = entries.get(settings.path_key)
        if env is None and (host is None or path is None):
            return None  # not ours: names no environment, nor a request that may
        verdict = Verdict(rid, env)
        if env is not None and not ENV_ID.fullmatch(env):
            verdict.problem = invalid_environment(
                f"descriptor entry {settings.env_key} {env[:80]!r} is not an environment id "
                "([a-z0-9][a-z0-9-]{0,62})")
            return verdict
        if descriptor.HasField("hits_addend"):
            hits = descriptor.hits_addend.value
        method = entries.get(settings.method_key, "GET")
        if path is not None:
            headers = CIMultiDict({"X-Request-Id": rid})
            if env is not None:
                headers["X-CloudBase-Env"] = env
            return await decide_described(self.state, self.tickets, Described(
                method, path, host or "", headers, cost_factor=hits))
        assert env is not None
        kind = entries.get(settings.kind_key, "")
        route = next((r for r in self.state.router.routes if r.kind == kind), None)
        if route is None or route.kind == "realtime" or route.actions is not None:
            verdict.problem = route_not_found(f"kind {kind[:40]!r}", env)
            return verdict
        return await decide_on_route(self.state, self.tickets, verdict, env, route,
                                     entries.get(settings.function_key, ""), method,
                                     route.cost * hits)

    async def should_rate_limit(self, message: Any) -> Any:
        settings = self.state.config.gateway.authz.ratelimit
        response = RateLimitResponse(overall_code=OK)
        if settings.domain and message.domain != settings.domain:
            for _ in message.descriptors:
                response.statuses.add(code=OK)
            return response
        hits = message.hits_addend or 1  # (0: one, as Envoy means it)
        rid = request_id({})
        refused: Verdict | None = None
        decided = False
        for descriptor in message.descriptors:
            # One decision per request: the first descriptor that names one; more such
            # descriptors (a second rate_limits entry) are answered OK, not charged again.
            verdict = None if decided else await self._one(descriptor, hits, rid)
            status = response.statuses.add(code=OK)
            if verdict is None:
                continue
            decided = True
            if verdict.problem is not None:
                status.code = OVER_LIMIT
                if refused is None:
                    refused = verdict
            _fill_limit(status, verdict)
            for name, value in verdict.headers.items():
                if name == "X-Quotagate-Decision":
                    response.request_headers_to_add.add(key=name, value=value)
                elif refused is None or verdict is refused:
                    response.response_headers_to_add.add(key=name, value=value)
        if refused is not None:
            assert refused.problem is not None
            problem = refused.problem
            response.overall_code = OVER_LIMIT
            body = problem.response(request_id=rid).body
            assert isinstance(body, bytes)
            response.raw_body = body
            extra = {"Content-Type": "application/problem+json", "X-Request-Id": rid,
                     "X-Quotagate-Status": str(problem.status)}
            if problem.retry_after_s is not None:
                extra["Retry-After"] = str(problem.retry_after_s)
            for name, value in extra.items():
                response.response_headers_to_add.add(key=name, value=value)
            log.debug("rate limit service refused %s: %s", refused.env,
                      json.loads(body)["type"])
        return response


#: A connection with a call open is pinged when it has been so for the idle timeout; one whose
#: ping goes unanswered for this long is closed (a peer gone without a word).
KEEPALIVE_TIMEOUT_S = 20.0
#: While a call is open on a connection, it is looked at this often (its idle time starts when
#: no call is open any more).
BUSY_POLL_S = 1.0


class _Bounded(asyncio.Protocol):
    """One connection of ``authz.grpc_listen``: grpclib's own protocol, within the listener's
    bounds (grpclib has no max-connection-idle nor handshake timeout of its own):

    - beyond the listener's cap, the server's SETTINGS and a GOAWAY (ENHANCE_YOUR_CALM, "too
      many connections") are sent and the connection closed, nothing of it read;
    - a connection that opens no call (the HTTP/2 preface, then a complete HEADERS frame)
      within the header timeout of its start, or has had no call open for the idle timeout
      since its last one, is sent GOAWAY (NO_ERROR: calls it sent meanwhile are known
      unprocessed, for the client to send again on a new connection) and closed a moment
      later. Idle sockets and slowloris senders alike: partial frames, pings and SETTINGS
      reset nothing. (A call whose request message does not come is ended by
      RateLimitService._rpc.)"""

    def __init__(self, inner: H2Protocol, listener: Listener, header_s: float,
                 idle_s: float):
        self.inner = inner
        self.listener = listener
        self.header_s = header_s
        self.idle_s = idle_s
        self.transport: asyncio.Transport | None = None
        self.refused = False
        self._timer: asyncio.TimerHandle | None = None
        #: When a call was last seen open (or the connection began), monotonic.
        self._busy_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's: no subclass)
        if self.listener.full():
            self.refused = True
            self.inner.handler.close()  # (never used: the server forgets it)
            conn = H2Connection(H2Configuration(client_side=False))
            conn.initiate_connection()
            conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, last_stream_id=0,
                                  additional_data=(
                                      f"too many connections: this gateway instance holds its "
                                      f"limit of {self.listener.limit} {self.listener.what} "
                                      f"({self.listener.setting})").encode())
            self.listener.refuse(self.transport, conn.data_to_send())
            return
        self.listener.opened()
        self.inner.connection_made(self.transport)
        self._busy_at = time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(self.header_s, self._check)

    def data_received(self, data: bytes) -> None:
        if not self.refused:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None  # (closed: grpclib's own protocol does the same)

    def pause_writing(self) -> None:
        if not self.refused:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if not self.refused:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.listener.closed()
        self.inner.connection_lost(exc)

    def _check(self) -> None:
        self._timer = None
        connection = self.inner.connection
        if connection.is_closing():
            return
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        if self.inner.processor.streams:  # a call open: idle only once none is
            self._busy_at = now
            self._timer = loop.call_later(min(BUSY_POLL_S, self.idle_s), self._check)
            return
        started = connection.streams_started > 0
        since = max(self._busy_at, connection.last_stream_created or 0.0)
        due = since + (self.idle_s if started else self.header_s)
        if now < due:
            self._timer = loop.call_later(due - now, self._check)
            return
        log.debug("closing a gRPC connection: %s", "idle" if started else "no call opened")
        # (grpclib keeps its H2Connection to itself; GOAWAY is the polite close)
        h2_connection: H2Connection | None = getattr(connection, "_connection", None)
        if h2_connection is not None:
            with contextlib.suppress(H2ProtocolError):
                h2_connection.close_connection(ErrorCodes.NO_ERROR)
                connection.flush()
        transport = self.transport
        assert transport is not None
        loop.call_later(REFUSED_LINGER_S, transport.close)


class BoundedServer(Server):
    """grpclib's server, each of its connections within ``listener``'s bounds (``_Bounded``)."""

    def __init__(self, handlers: list[Any], *, listener: Listener, header_s: float,
                 idle_s: float):
        super().__init__(handlers, config=Configuration(
            _keepalive_time=idle_s, _keepalive_timeout=KEEPALIVE_TIMEOUT_S,
            _keepalive_permit_without_calls=False,
            _http2_min_sent_ping_interval_without_data=idle_s))
        self.listener = listener
        self.header_s = header_s
        self.idle_s = idle_s

    def _protocol_factory(self) -> H2Protocol:  # (grpclib's: each connection's protocol)
        inner = super()._protocol_factory()
        return _Bounded(inner, self.listener, self.header_s,  # type: ignore[return-value]
                        self.idle_s)


def grpc_server(state: GatewayState, tickets: Tickets, listener: Listener) -> Server:
    """``authz.grpc_listen``'s server: at most ``listener.limit`` connections, each within
    gateway.yaml ``clients.header_timeout_ms`` and ``grpc_idle_timeout_ms``."""
    clients = state.config.gateway.clients
    header_s = clients.header_timeout_ms / 1000
    return BoundedServer([RateLimitService(state, tickets)], listener=listener,
                         header_s=header_s,
                         idle_s=(clients.grpc_idle_timeout_ms / 1000) or header_s)
