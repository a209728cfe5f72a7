"""Every refusal the gateway sends, as application/problem+json (RFC 9457), built in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass

from aiohttp import web

from quotagate.common.problem import problem_response
from quotagate.limiter.codes import Outcome
from quotagate.limiter.limiter import Decision

#: The upper-case ``code`` of each problem type: what the platform's SDKs read from an error
#: body (docs/troubleshooting.md lists them). The realtime ERROR frame uses the same for
#: connections.
CODES = {
    "qps-exceeded": "QPS_LIMIT_EXCEEDED",
    "quota-exceeded": "QUOTA_EXCEEDED",
    "concurrency-exceeded": "CONCURRENCY_LIMIT_EXCEEDED",
    "connections-exceeded": "REALTIME_CONNECTION_LIMIT_EXCEEDED",
    "environment-isolated": "ENVIRONMENT_ISOLATED",
    "environment-not-found": "ENVIRONMENT_NOT_FOUND",
    "store-unavailable": "STORE_UNAVAILABLE",
    "invalid-environment": "INVALID_ENVIRONMENT",
    "invalid-path": "INVALID_PATH",
    "invalid-function": "INVALID_FUNCTION",
    "invalid-action": "INVALID_ACTION",
    "body-too-large": "BODY_TOO_LARGE",
    "queue-full": "QUEUE_FULL",
    "request-timeout": "REQUEST_TIMEOUT",
    "too-many-connections": "TOO_MANY_CONNECTIONS",
    "websocket-required": "WEBSOCKET_REQUIRED",
    "route-not-found": "ROUTE_NOT_FOUND",
    "upstream-unavailable": "UPSTREAM_UNAVAILABLE",
    "upstream-timeout": "UPSTREAM_TIMEOUT",
    "proxy-required": "PROXY_REQUIRED",
    "invalid-decision": "INVALID_DECISION",
}


@dataclass(frozen=True)
class Problem(Exception):
    status: int
    type_suffix: str
    title: str
    detail: str
    env: str | None = None
    meter: str | None = None
    retry_after_s: int | None = None
    #: Which limit refused, where two can: "plan" or "gateway-version" (QPS).
    limit: str | None = None

    def response(self, extra_headers: dict[str, str] | None = None,
                 request_id: str | None = None) -> web.Response:
        """RFC 9457 members, then the ones the platform's SDKs read (``code``, ``message``,
        ``requestId``); ``request_id`` is echoed in X-Request-Id too."""
        headers = dict(extra_headers or {})
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(self.retry_after_s)
        if request_id is not None:
            headers["X-Request-Id"] = request_id
        limit = {"limit": self.limit} if self.limit else {}
        return problem_response(self.status, self.type_suffix, self.title, self.detail,
                                headers, env=self.env, meter=self.meter, **limit,
                                **{"violated-policies": [self.meter] if self.meter else [],
                                   "code": CODES[self.type_suffix], "message": self.detail,
                                   "requestId": request_id})


def seconds_up(ms: int) -> int:
    return max(1, math.ceil(ms / 1000))


def refusal(decision: Decision, env: str) -> Problem:
    """The problem for a refused decision."""
    outcome = decision.outcome
    if outcome is Outcome.QPS_EXCEEDED:
        whose = "its gateway version's" if decision.qps_by_gateway else "its"
        return Problem(429, "qps-exceeded", "Too many requests",
                       f"environment {env} is over {whose} limit of {decision.qps_limit} "
                       "requests per second", env, "qps", seconds_up(decision.retry_after_ms),
                       "gateway-version" if decision.qps_by_gateway else "plan")
    if outcome is Outcome.QUOTA_EXCEEDED:
        return Problem(429, "quota-exceeded", "Quota exhausted",
                       f"environment {env} has used its {decision.meter} quota and packs for this "
                       "billing cycle and overage is off", env, decision.meter,
                       seconds_up(decision.retry_after_ms))
    if outcome is Outcome.CONCURRENCY_EXCEEDED:
        if decision.meter == "realtime":
            return Problem(429, "connections-exceeded", "Too many realtime connections",
                           f"environment {env} has {decision.in_use} of its {decision.cap} "
                           "realtime connections open", env, "realtime")
        return Problem(429, "concurrency-exceeded", "Too many concurrent invocations",
                       f"this function of environment {env} runs {decision.in_use} of its "
                       f"{decision.cap} concurrent invocations", env, "function_concurrency")
    if outcome is Outcome.ISOLATED:
        return Problem(403, "environment-isolated", "Environment isolated",
                       f"the plan of environment {env} has expired; renew it to restore service",
                       env)
    if outcome is Outcome.NOT_STARTED:
        return Problem(403, "environment-isolated", "Plan not started",
                       f"the plan of environment {env} starts later", env)
    return Problem(404, "environment-not-found", "Environment not found",
                   f"no environment {env}", env)


def store_unavailable(env: str) -> Problem:
    return Problem(503, "store-unavailable", "Quota store unavailable",
                   "the quota store cannot be reached and the gateway fails closed", env,
                   retry_after_s=1)


def invalid_environment(detail: str) -> Problem:
    return Problem(400, "invalid-environment", "Invalid environment id", detail)


def invalid_path(target: str, env: str) -> Problem:
    return Problem(400, "invalid-path", "Invalid request target",
                   f"request target {target!r} has dot-segments or is not in origin form", env)


def invalid_function(path: str, env: str) -> Problem:
    return Problem(400, "invalid-function", "Invalid function name",
                   f"no function name ([A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}) in {path[:200]!r}",
                   env)


def websocket_required(env: str | None) -> Problem:
    """426 (RFC 9110 §15.5.22): send it with ``Upgrade: websocket``."""
    return Problem(426, "websocket-required", "WebSocket required",
                   "this realtime route takes WebSocket upgrades only", env)


def invalid_action(detail: str, env: str | None) -> Problem:
    return Problem(400, "invalid-action", "Invalid action request", detail, env)


def body_too_large(limit: int, env: str | None, what: str = "an action request's body is "
                   "read to find its action") -> Problem:
    return Problem(413, "body-too-large", "Request body too large",
                   f"{what}: at most {limit} bytes", env)


def request_timeout(limit_ms: int, env: str | None) -> Problem:
    return Problem(408, "request-timeout", "Request body too slow",
                   f"the body must arrive within {limit_ms} ms (clients.body_timeout_ms): "
                   "the gateway reads it to count the request", env)


def too_many_connections(limit: int, setting: str = "clients.max_connections",
                         what: str = "client connections") -> Problem:
    return Problem(503, "too-many-connections", "Too many connections",
                   f"this gateway instance holds its limit of {limit} {what} ({setting}): "
                   "retry shortly", None, None, 1)


def queue_full(env: str) -> Problem:
    return Problem(429, "queue-full", "Invocation queue full",
                   f"the queue of isolated environment {env} is full: renew the environment "
                   "to run what is queued", env)


def route_not_found(path: str, env: str) -> Problem:
    return Problem(404, "route-not-found", "No route", f"no route for {path!r}", env)


def upstream_unavailable(env: str | None, detail: str) -> Problem:
    return Problem(502, "upstream-unavailable", "Upstream unavailable", detail, env)


def upstream_timeout(env: str | None, detail: str) -> Problem:
    return Problem(504, "upstream-timeout", "Upstream timeout", detail, env)


def proxy_required(env: str | None, what: str) -> Problem:
    """Plugin mode: a request a proxy's decision call cannot describe enough to count."""
    return Problem(501, "proxy-required", "Route this through quotagate's proxy",
                   f"{what}: send these requests through quotagate's own listener (the "
                   "proxy), not its decision service", env)


def invalid_decision(detail: str) -> Problem:
    """Plugin mode: a done call whose decision token is missing, forged or malformed."""
    return Problem(400, "invalid-decision", "Invalid decision token", detail)
