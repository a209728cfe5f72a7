"""The state the gateway's front doors share: the HTTP proxy (``gateway/proxy/``), the
realtime relay (``gateway/realtime/``) and plugin mode (``gateway/plugin/``) import it from
here, and none of them owns it. The public listener's composition (``gateway/app.py``) makes
it and keeps it under ``STATE``.

It is small on purpose: what a request needs to be routed, decided and forwarded. Reloading,
syncing and the control plane's background work are the ``Runtime``'s (control/runtime.py),
which tells this state of every config it applies.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aredis
from aiohttp import web
from redis.asyncio.cluster import RedisCluster

from quotagate.control.runtime import Runtime
from quotagate.gateway.accesslog import AccessLog
from quotagate.gateway.decisions import decide
from quotagate.gateway.envid import all_domains
from quotagate.gateway.problems import Problem
from quotagate.gateway.routing import CompiledRoute, Router
from quotagate.gateway.upstream import UpstreamPool
from quotagate.limiter.limiter import Limiter
from quotagate.settings import Config


class Socket(Protocol):
    """An open realtime socket, as the state sees it."""

    def end_environment(self, status: str) -> None: ...

    def shutdown(self) -> Awaitable[None]: ...


class Upgrade(Protocol):
    """A WebSocket upgrade on a realtime route, handed by the HTTP door to the realtime door
    (``realtime.upgrade.handle_upgrade``, set by ``app.init_app``: neither door imports the
    other)."""

    def __call__(self, request: web.Request, state: GatewayState, route: CompiledRoute,
                 env: str | None, path_qs: str, request_id: str
                 ) -> Awaitable[web.StreamResponse]: ...


@dataclass
class GatewayState:
    runtime: Runtime
    pool: UpstreamPool
    config: Config = field(init=False)
    router: Router = field(init=False)
    limiter: Limiter = field(init=False)
    redis: aredis.Redis | RedisCluster = field(init=False)
    #: Environments whose mode (from the file) differs from the gateway's: "off" skips the store.
    env_modes: dict[str, str] = field(init=False)
    #: ".<domain>" of each host domain that names environments (envid.all_domains).
    env_suffixes: tuple[str, ...] = field(init=False)
    #: Open realtime sockets per environment (closed when the environment is isolated).
    sockets: dict[str, set[Socket]] = field(default_factory=dict)
    #: Open realtime sockets that have not named their environment yet (LOGIN pending).
    unnamed_sockets: set[Socket] = field(default_factory=set)
    #: One JSON line per request (``access_log``); None when off.
    access_log: AccessLog | None = None
    #: Where the HTTP door sends a WebSocket upgrade on a realtime route (the realtime door's
    #: handler, set by the composition: ``app.init_app``).
    upgrade: Upgrade | None = None

    def __post_init__(self) -> None:
        self.limiter = self.runtime.limiter
        self.redis = self.runtime.redis
        self.apply(self.runtime.config)
        self.runtime.on_config.append(self.apply)
        self.limiter.on_ended = self.environment_ended

    def apply(self, config: Config) -> None:
        """A config applied (at start, at a reload): routes, host domains, modes."""
        gw = config.gateway
        self.config = config
        self.router = Router(gw.routes)
        self.env_suffixes = all_domains(gw.domains, gw.domain)
        self.env_modes = config.modes
        if self.access_log is not None and (not gw.access_log or gw.access_log_file
                                            or self.access_log.path):
            self.access_log.close()  # off, or a file opened again (after a rotation)
            self.access_log = None
        if gw.access_log and self.access_log is None:
            self.access_log = AccessLog.to(
                config.resolve(gw.access_log_file) if gw.access_log_file else None)

    def upstream_base(self, path_qs: str) -> str | None:
        """Where a queued invocation of this path goes (its route's upstream)."""
        route = self.router.match(path_qs.split("?", 1)[0], "POST", "")
        return None if route is None else route.origin + route.base_path

    async def admit_replay(self, env: str, entry: dict) -> bool:
        """A queued invocation is replayed like a request: decided and counted (calls, QPS)."""
        route = self.router.match(entry["path"].split("?", 1)[0], entry["method"], "")
        if route is None:
            return True  # no route any more: sent and dropped by the upstream
        if route.actions is not None:  # only invocations are queued
            route = route.actions["function"]
        decision = await decide(self.limiter, env, route.kind, route.cost)
        return not isinstance(decision, Problem) and decision.admitted

    def memory_mb(self, env: str, function: str, route: CompiledRoute) -> int:
        """A function's memory for GBs: the environment's setting, else the route's."""
        declared = self.config.environments.environments.get(env)
        if declared is not None:
            fn = declared.functions.get(function)
            if fn is not None:
                return fn.memory_mb
        return route.route.memory_mb

    def environment_ended(self, env: str, status: str) -> None:
        """A lease renewal found the environment isolated or gone: close its watches.

        Not in shadow or off mode (they never refuse). A missing snapshot of an environment
        the file declares means the store lost its data: it is written again, sockets stay.
        """
        if self.env_modes.get(env, self.config.gateway.enforcement) != "enforce":
            return
        if status == "missing":
            if env in self.config.environments.environments:
                self.runtime.resync_if_declared(env)
                return
            status = "not-found"
        for sock in list(self.sockets.get(env, ())):
            sock.end_environment(status)


#: The public application's key for its state (``app.init_app`` sets it; each front door's
#: handler reads it from its request's application).
STATE = web.AppKey("state", GatewayState)
