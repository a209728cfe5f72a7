"""Plugin mode for Envoy's rate limit filter: ``envoy.service.ratelimit.v3.RateLimitService/
ShouldRateLimit`` over gRPC, a drop-in for the envoyproxy/ratelimit service
(``authz.grpc_listen``).

Each descriptor whose entries name an environment (``authz.ratelimit.env_key``) is one
decision: routed by its path entry as the HTTP front doors route a request (kind, cost,
function slot), or by its kind entry (the first route of that kind), at the route's cost
times ``hits_addend``. Descriptors naming no environment are answered OK, untouched; any
refused makes the overall code OVER_LIMIT, with the problem as the local reply's body and the
RateLimit headers. Nothing calls back after the response: a function slot ends with the
route's ``max_duration_ms`` lease (unless the platform's service sends the done call with the
``X-Quotagate-Decision`` request header's ticket), and GBs and bytes are not metered.

The stack: grpclib (HTTP/2 gRPC on asyncio, so the service runs on the gateway's own event
loop and shares its limiter and pipelined store connection; grpcio's server keeps its own
threads and completion queue) with envoy-data-plane's messages, generated from Envoy's own
protos.
"""

from __future__ import annotations

import datetime as dt
import json
import logging

from envoy_data_plane.envoy.config.core.v3 import HeaderValue
from envoy_data_plane.envoy.extensions.common.ratelimit.v3 import RateLimitDescriptor
from envoy_data_plane.envoy.service.ratelimit.v3 import (
    RateLimitRequest,
    RateLimitResponse,
    RateLimitResponseCode,
    RateLimitResponseDescriptorStatus,
    RateLimitResponseRateLimit,
    RateLimitResponseRateLimitUnit,
    RateLimitServiceBase,
)
from grpclib.server import Server
from multidict import CIMultiDict

from quotagate.common.envids import ENV_ID
from quotagate.gateway.plugin import (
    Described,
    Tickets,
    Verdict,
    decide_described,
    decide_on_route,
    request_id,
)
from quotagate.gateway.problems import invalid_environment, route_not_found
from quotagate.gateway.state import GatewayState
from quotagate.limiter.codes import Outcome

log = logging.getLogger("quotagate.gateway")

UINT32 = 2**32 - 1
OK = RateLimitResponseCode.OK
OVER_LIMIT = RateLimitResponseCode.OVER_LIMIT


def _limit(verdict: Verdict) -> tuple[RateLimitResponseRateLimit | None, int, int]:
    """The limit a descriptor's status reports: the one that refused, else the calls quota
    (or QPS when no quota is known); with what is left and ms until it resets."""
    d = verdict.decision
    if d is None or d.qps_limit <= 0:
        return None, 0, 0
    if d.outcome is Outcome.QPS_EXCEEDED or d.window_s <= 0:
        return (RateLimitResponseRateLimit(name="qps", requests_per_unit=min(d.qps_limit, UINT32),
                                           unit=RateLimitResponseRateLimitUnit.SECOND),
                d.qps_remaining, d.qps_reset_ms)
    return (RateLimitResponseRateLimit(name=d.meter or "calls",
                                       requests_per_unit=min(d.quota, UINT32),
                                       unit=RateLimitResponseRateLimitUnit.MONTH),
            max(0, d.remaining), max(0, d.reset_ms))


class RateLimitService(RateLimitServiceBase):
    def __init__(self, state: GatewayState, tickets: Tickets):
        self.state = state
        self.tickets = tickets

    async def _one(self, descriptor: RateLimitDescriptor, hits: int, rid: str
                   ) -> Verdict | None:
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
        if descriptor.hits_addend is not None:
            hits = descriptor.hits_addend
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

    async def should_rate_limit(self, message: RateLimitRequest) -> RateLimitResponse:
        settings = self.state.config.gateway.authz.ratelimit
        response = RateLimitResponse(overall_code=OK)
        if settings.domain and message.domain != settings.domain:
            response.statuses = [RateLimitResponseDescriptorStatus(code=OK)
                                 for _ in message.descriptors]
            return response
        hits = message.hits_addend or 1  # (0: one, as Envoy means it)
        rid = request_id({})
        refused: Verdict | None = None
        for descriptor in message.descriptors:
            verdict = await self._one(descriptor, hits, rid)
            if verdict is None:
                response.statuses.append(RateLimitResponseDescriptorStatus(code=OK))
                continue
            limit, remaining, reset_ms = _limit(verdict)
            status = RateLimitResponseDescriptorStatus(
                code=OVER_LIMIT if verdict.problem is not None else OK, current_limit=limit,
                limit_remaining=min(remaining, UINT32),
                duration_until_reset=dt.timedelta(milliseconds=reset_ms) if limit else None)
            response.statuses.append(status)
            if verdict.problem is not None and refused is None:
                refused = verdict
            for name, value in verdict.headers.items():
                if name == "X-Quotagate-Decision":
                    response.request_headers_to_add.append(HeaderValue(key=name, value=value))
                elif refused is None or verdict is refused:
                    response.response_headers_to_add.append(HeaderValue(key=name, value=value))
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
            response.response_headers_to_add += [HeaderValue(key=k, value=v)
                                                 for k, v in extra.items()]
            log.debug("rate limit service refused %s: %s", refused.env,
                      json.loads(body)["type"])
        return response


def grpc_server(state: GatewayState, tickets: Tickets) -> Server:
    return Server([RateLimitService(state, tickets)])
