"""The gateway's aiohttp applications: ``init_app`` (public proxy) and ``init_admin_app``.

A request flows: environment id (host or header, validated) -> route (prefix, method, Accept)
-> one limiter decision (one EVALSHA, pipelined with concurrent ones) -> refusal as
problem+json, or a streamed proxy to the upstream with RateLimit headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec
import redis.asyncio as aredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from redis.asyncio.cluster import RedisCluster

from quotagate.common import metrics
from quotagate.common.addresses import StoreAddress
from quotagate.common.aio import stop_if_cancelling
from quotagate.common.clock import SYNC_INTERVAL_S, Clock, StoreClock
from quotagate.common.logs import decisions as decisions_log
from quotagate.control import api as control_api
from quotagate.control import events as control_events
from quotagate.control.envs import Environments
from quotagate.control.lifecycle import QUEUE_MAX_BODY, Scheduler, enqueue
from quotagate.gateway import realtime, streams
from quotagate.gateway.actions import read_action, read_body
from quotagate.gateway.decisions import decide
from quotagate.gateway.envid import all_domains, environment_of, missing_environment
from quotagate.gateway.headers import ratelimit_headers
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
from quotagate.gateway.proxy import Tally, UpstreamPool
from quotagate.gateway.routing import WRITE_METHODS, CompiledRoute, Router
from quotagate.limiter import keys
from quotagate.limiter.cluster import ClusterStore
from quotagate.limiter.codes import Flag, Outcome
from quotagate.limiter.entitlements import build_snapshot, encode
from quotagate.limiter.errors import StoreError
from quotagate.limiter.limiter import Decision, Limiter
from quotagate.limiter.store import PipelinedStore
from quotagate.limiter.sync import check_store_version, sync_environments
from quotagate.settings import Config, ConfigError, load_config
from quotagate.settings.load import check_environments
from quotagate.settings.schema import Environment, EnvironmentsFile

log = logging.getLogger("quotagate.gateway")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_REASONS = {o: o.name.lower().replace("_", "-") for o in Outcome}
# Bound once: the hot path must not look labels up per request.
_ADMITTED = metrics.DECISIONS.labels("admitted", "")
_OFF = metrics.DECISIONS.labels("off", "")


@dataclass
class GatewayState:
    config: Config
    store_url: str
    router: Router
    limiter: Limiter
    pool: UpstreamPool
    redis: aredis.Redis | RedisCluster
    #: Environments whose mode (from the file) differs from the gateway's: "off" skips the store.
    env_modes: dict[str, str] = field(default_factory=dict)
    #: ".<domain>" of each host domain that names environments (envid.all_domains).
    env_suffixes: tuple[str, ...] = ()
    synced: bool = False
    sync_task: asyncio.Task[None] | None = None
    #: monotonic time of the last re-sync asked for by a missing snapshot (debounce).
    resync_at: float = 0.0
    #: The lifecycle scheduler (set when the app starts).
    scheduler: Scheduler | None = None
    #: Open realtime sockets per environment (closed when the environment is isolated).
    sockets: dict[str, set[realtime.RealtimeSocket]] = field(default_factory=dict)
    #: Open realtime sockets that have not named their environment yet (LOGIN pending).
    unnamed_sockets: set[realtime.RealtimeSocket] = field(default_factory=set)

    #: Config files' modification times at the last (attempted) load.
    mtimes: dict[str, float] = field(default_factory=dict)
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    async def reload(self, why: str = "requested") -> bool:
        """Load the config files again; apply them if valid, else keep the last good config.

        Routes, environments, plans, modes and the failure policy apply at once; listeners,
        the store and worker count need a restart (logged). Returns whether it was applied.
        """
        async with self.reload_lock:
            path = self.config.files[0] if self.config.files else None
            if path is None:
                return False
            self.mtimes = _mtimes(self.config.files)
            try:
                config = load_config(path)
            except ConfigError as exc:
                metrics.RELOADS.labels("failure").inc()
                for issue in exc.issues:
                    log.error("config reload (%s) refused, the last good config stays: %s",
                              why, issue)
                return False
            api_owned = await self._api_records()
            broken = [f"{env_id}: {issue.path}: {issue.reason}"
                      for env_id, env in api_owned.items()
                      for issue in check_environments(
                          EnvironmentsFile(environments={env_id: env}), config.plans,
                          "store (API-owned)")]
            if broken:
                metrics.RELOADS.labels("failure").inc()
                for line in broken:
                    log.error("config reload (%s) refused, the last good config stays: an "
                              "API-owned environment would be invalid: %s", why, line)
                return False
            old = self.config.gateway
            new = config.gateway
            for key in ("listen", "admin_listen", "store", "upstream", "leases", "events",
                        "lifecycle_interval_ms", "reload_poll_ms"):
                if getattr(old, key) != getattr(new, key):
                    log.warning("config reload: %s changed; it takes effect at the next "
                                "restart", key)
            for key in ("header_timeout_ms", "max_connections"):  # the listener's
                if getattr(old.clients, key) != getattr(new.clients, key):
                    log.warning("config reload: clients.%s changed; it takes effect at the "
                                "next restart", key)
            self.config = config
            self.limiter.known.update(config.environments.environments)
            self.router = Router(new.routes)
            self.env_suffixes = all_domains(new.domains, new.domain)
            self.env_modes = {env_id: env.mode
                              for env_id, env in config.environments.environments.items()
                              if env.mode is not None}
            self.limiter.on_failure = new.on_store_failure
            metrics.label_envs(new.metrics_envs)
            self.limiter.set_burst_ms(new.qps_burst_ms)
            self.limiter.mode = "shadow" if new.enforcement == "shadow" else "enforce"
            self.mtimes = _mtimes(config.files)
            self.synced = False
            try:
                await sync_environments(self.redis, config)
                await self._rewrite_api_snapshots(api_owned, config)
                self.synced = True
            except (aredis.RedisError, OSError, StoreError) as exc:
                log.warning("config reload: environments not written yet (%s); retrying", exc)
                self.sync_task = asyncio.get_running_loop().create_task(_sync_until_done(self))
            metrics.RELOADS.labels("success").inc()
            log.info("config reloaded (%s): %d routes, %d environments", why, len(new.routes),
                     len(config.environments.environments))
            return True

    def journal_dir(self) -> Path | None:
        store = self.config.gateway.store
        if not store.journal:
            return None
        return self.config.resolve(store.journal_dir or str(Path(store.data_dir) / "journal"))

    async def learn_api_owned(self) -> None:
        """The API-owned environments exist: admitted fail-open like the declared ones."""
        ids = await self.redis.smembers(keys.API_OWNED_ENVS)
        self.limiter.known.update(m.decode() if isinstance(m, bytes) else m for m in ids)

    async def _api_records(self) -> dict[str, Environment]:
        """API-owned environments' records (their snapshots depend on plans.yaml too)."""
        out: dict[str, Environment] = {}
        try:
            ids = [m.decode() if isinstance(m, bytes) else m
                   for m in await self.redis.smembers(keys.API_OWNED_ENVS)]
            for env_id in ids:
                raw = await self.redis.get(keys.definition(env_id))
                if raw is None:
                    continue
                try:
                    out[env_id] = msgspec.json.decode(raw, type=Environment)
                except msgspec.ValidationError as exc:  # e.g. stored before a bound existed
                    log.error("config reload: the stored record of %s is no longer valid "
                              "(%s); its snapshot is left as it is: put it again", env_id, exc)
        except (aredis.RedisError, OSError) as exc:
            log.warning("config reload: API-owned environments not read (%s)", exc)
        return out

    async def _rewrite_api_snapshots(self, records: dict[str, Environment],
                                     config: Config) -> None:
        for env_id, env in records.items():
            if env_id in config.environments.environments:
                continue  # the file owns it now
            await self.redis.set(keys.entitlements(env_id), encode(
                build_snapshot(env, config.plans, config.gateway.timezone)))

    def files_changed(self) -> bool:
        return bool(self.config.files) and _mtimes(self.config.files) != self.mtimes

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

    async def carry_capacity(self, env: str) -> None:
        """Report the last capacity size again for today (its excess is billed per day)."""
        size = await self.redis.hget(keys.usage(env), "gauge:capacity_bytes")
        if size is not None and int(size) > 0:
            self.limiter.meter(env, "capacity_bytes", int(size))

    def renewed(self, env: str) -> None:
        """An environment was renewed: replay its queued invocations now."""
        if self.scheduler is not None:
            task = asyncio.get_running_loop().create_task(self.scheduler.replay(env))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

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
                self.resync_if_declared(env)
                return
            status = "not-found"
        for sock in list(self.sockets.get(env, ())):
            sock.end_environment(status)

    def resync_if_declared(self, env: str) -> None:
        """The store has no snapshot of an environment the file declares: it lost its data
        (restart without persistence, flush). Write the file again, at most every 5 s."""
        if env not in self.config.environments.environments:
            return
        now = time.monotonic()
        if now - self.resync_at < 5.0 or (self.sync_task and not self.sync_task.done()):
            return
        self.resync_at = now
        log.warning("store has no snapshot of %s: writing the environments again", env)
        self.synced = False
        self.sync_task = asyncio.get_running_loop().create_task(_sync_until_done(self))


STATE = web.AppKey("state", GatewayState)


def _mtimes(files: tuple[Path, ...]) -> dict[str, float]:
    out = {}
    for f in files:
        try:
            out[str(f)] = f.stat().st_mtime
        except OSError:
            out[str(f)] = -1.0
    return out


async def _watch_files(state: GatewayState) -> None:
    """Reload when a config file changes (polled every ``reload_poll_ms``)."""
    while True:
        await asyncio.sleep(state.config.gateway.reload_poll_ms / 1000)
        if state.config.gateway.reload_poll_ms and state.files_changed():
            await state.reload("a config file changed")


def build_state(config: Config, store_url: str, clock: Clock | None = None) -> GatewayState:
    gw = config.gateway
    tls = [str(config.resolve(f)) if f else ""
           for f in (gw.store.tls.ca_file, gw.store.tls.cert_file, gw.store.tls.key_file)]
    address = StoreAddress.from_url(store_url).with_tls(*tls)
    store_class = ClusterStore if gw.store.cluster else PipelinedStore
    store = store_class(address, timeout_ms=gw.store.timeout_ms,
                        connect_timeout_ms=gw.store.connect_timeout_ms,
                        retry_interval_ms=gw.store.retry_interval_ms)
    mode: Literal["enforce", "shadow"] = "shadow" if gw.enforcement == "shadow" else "enforce"
    limiter = Limiter(
        store, clock=clock, mode=mode, burst_ms=gw.qps_burst_ms, on_failure=gw.on_store_failure,
        lease_ms=gw.leases.ttl_ms, renew_interval_ms=gw.leases.renew_interval_ms,
    )
    timeout_s = max(gw.store.timeout_ms, gw.store.connect_timeout_ms) / 1000
    client_class = RedisCluster if gw.store.cluster else aredis.Redis
    # The control plane's client: the same TLS (the server verified by the URL's host).
    tls_kwargs: dict[str, Any] = {"ssl_ca_certs": tls[0] or None, "ssl_certfile": tls[1] or None,
                                  "ssl_keyfile": tls[2] or None,
                                  "ssl_check_hostname": True} if address.tls else {}
    client = client_class.from_url(
        store_url, socket_timeout=timeout_s * 5, socket_connect_timeout=timeout_s * 5,
        **tls_kwargs)
    env_modes: dict[str, str] = {
        env_id: env.mode
        for env_id, env in config.environments.environments.items()
        if env.mode is not None
    }
    state = GatewayState(config, store_url, Router(gw.routes), limiter,
                         UpstreamPool(gw.upstream), client, env_modes,
                         env_suffixes=all_domains(gw.domains, gw.domain))
    limiter.on_missing = state.resync_if_declared
    metrics.label_envs(gw.metrics_envs)
    limiter.on_ended = state.environment_ended
    return state


async def _sync_until_done(state: GatewayState) -> None:
    delay = 0.2
    state.limiter.known.update(state.config.environments.environments)
    while True:
        try:
            await check_store_version(state.redis)
            await sync_store_clock(state)
            await sync_environments(state.redis, state.config)
            await state.limiter.load_scripts()
            await state.learn_api_owned()
            state.synced = True
            return
        except (aredis.RedisError, OSError, StoreError) as exc:
            stop_if_cancelling(exc)
            log.warning("store not ready for the environment sync (%s); retrying", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def sync_store_clock(state: GatewayState) -> None:
    """Sample the store's TIME (production clock only; a test's manual clock stays)."""
    clock = state.limiter.clock
    if not isinstance(clock, StoreClock):
        return

    async def store_time() -> tuple[int, int]:
        seconds, micros = await state.limiter.store.execute("TIME")
        return int(seconds), int(micros)

    await clock.sync(store_time)
    metrics.CLOCK_SKEW.set(clock.skew_ms / 1000)


async def _follow_store_clock(state: GatewayState) -> None:
    """Sample the store's clock again every SYNC_INTERVAL_S (a stepped clock, a failover)."""
    while True:
        await asyncio.sleep(SYNC_INTERVAL_S)
        try:
            await sync_store_clock(state)
            await state.learn_api_owned()  # put by the admin API of any instance since
        except Exception as exc:  # never the end of following it
            stop_if_cancelling(exc)
            log.warning("could not sample the store's clock (%r); dates run on the last "
                        "sample", exc)


async def _recover_journals(state: GatewayState) -> None:
    """Write back what gateways that stopped during a store outage left in their journals
    (journal.py); the store being away again only delays it."""
    directory = state.journal_dir()
    if directory is None:
        return
    delay = 0.5
    while True:
        try:
            await state.limiter.recover_journals(directory)
            return
        except (StoreError, OSError) as exc:
            stop_if_cancelling(exc)
            log.warning("journals of stopped gateways not written back yet (%s); retrying",
                        exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


#: How long a stopping gateway waits for its background tasks.
STOP_WAIT_S = 10.0


async def _once_synced(state: GatewayState, work: Callable[[], Awaitable[None]]) -> None:
    """Run ``work()`` once the store is synced (environments written, clock sampled)."""
    assert state.sync_task is not None
    await asyncio.shield(state.sync_task)
    await work()


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    journal = state.journal_dir()
    if journal is not None:
        try:
            state.limiter.open_journal(journal)
        except (OSError, RuntimeError) as exc:
            log.error("no journal for the fail-open backlog (%s): usage admitted while the "
                      "store is away is lost if this process dies before writing it back", exc)
    await state.pool.start()
    state.limiter.start_renewing()
    state.mtimes = _mtimes(state.config.files)
    loop = asyncio.get_running_loop()
    watcher = (loop.create_task(_watch_files(state))
               if state.config.gateway.reload_poll_ms else None)
    state.sync_task = loop.create_task(_sync_until_done(state))
    background = [loop.create_task(control_events.sweep_forever(state.redis, state.limiter)),
                  loop.create_task(_follow_store_clock(state))]
    state.scheduler = Scheduler(
        Environments(state.redis, lambda: state.config, state.limiter.clock),  # type: ignore[arg-type]
        state.limiter.clock, state.upstream_base, state.pool.session,
        forward=state.limiter.forward_events, admit=state.admit_replay,
        carry=state.carry_capacity)
    background.append(loop.create_task(_once_synced(
        state, functools.partial(_recover_journals, state))))
    if state.config.gateway.lifecycle_interval_ms:
        # Not before the clock is sampled: its dates are the store's.
        interval_s = state.config.gateway.lifecycle_interval_ms / 1000
        background.append(loop.create_task(_once_synced(
            state, functools.partial(state.scheduler.run, interval_s))))
    if state.config.gateway.events.webhook_url:
        delivery = control_events.WebhookDelivery(
            state.redis, state.config.gateway.events, state.limiter.instance)  # type: ignore[arg-type]
        background.append(loop.create_task(delivery.run()))
    with contextlib.suppress(TimeoutError):
        # Usually done at once; a store that is down must not block the start.
        await asyncio.wait_for(asyncio.shield(state.sync_task), 2.0)
    yield
    tasks = [*background, *([watcher] if watcher is not None else []), state.sync_task]
    for task in tasks:
        task.cancel()
    # Bounded, and whatever they ended with: the rest of the cleanup (slots given back, the
    # backlog written) must run.
    done, pending = await asyncio.wait(tasks, timeout=STOP_WAIT_S)
    for task in pending:
        log.error("background task %s did not stop within %.0f s", task.get_coro(),
                  STOP_WAIT_S)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s had failed: %r", task.get_coro(), task.exception())
    if state.limiter.backlog.pending:  # flush_backlog holds a lock: never twice at once
        with contextlib.suppress(StoreError):
            await state.limiter.flush_backlog()
    await state.limiter.close()
    await state.pool.close()
    await state.redis.aclose()


async def _close_sockets(app: web.Application) -> None:
    """On shutdown, realtime sockets are told to go away (their slots go back at cleanup)."""
    state = app[STATE]
    sockets = [*(s for peers in state.sockets.values() for s in peers), *state.unnamed_sockets]
    await asyncio.gather(*(s.shutdown() for s in sockets), return_exceptions=True)


_DOT_SEGMENT = re.compile(r"(^|/)\.\.?(/|$)")


def _origin_form(request: web.Request) -> str | None:
    """The path and query to forward, or None to refuse the request target.

    Routing matches the decoded path and the upstream gets the raw one, so a target whose
    decoded path holds dot-segments (``/database/%2e%2e/ai/chat``) is refused: an upstream that
    normalises it would serve a route other than the one charged. An absolute-form target
    (``GET http://host/path``) is forwarded by its path and query.
    """
    if _DOT_SEGMENT.search(request.path):
        return None
    raw = request.raw_path
    if raw.startswith("/"):
        return raw
    parts = urlsplit(raw)
    if not parts.scheme or not parts.path.startswith("/"):
        return None
    return parts.path + (f"?{parts.query}" if parts.query else "")


#: Request ids: 16 random hex digits per process, then a counter (unique, and far cheaper per
#: request than uuid4).
_ID_PREFIX = secrets.token_hex(8)
_ids = itertools.count(1)


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return f"{_ID_PREFIX}{next(_ids):016x}"


def _refused_early(problem: Problem, request_id: str) -> web.Response:
    """A refusal before any store call (bad input): counted, never charged."""
    metrics.INVALID_REQUESTS.labels(problem.type_suffix).inc()
    return problem.response(request_id=request_id)


async def handle(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    gw = state.config.gateway
    request_id = _request_id(request)
    try:
        env = environment_of(request, state.env_suffixes)
    except Problem as problem:
        return _refused_early(problem, request_id)
    path_qs: str | None = request.raw_path
    if not request.raw_path.startswith("/") or "/." in request.path:
        path_qs = _origin_form(request)
    if path_qs is None:
        return _refused_early(invalid_path(request.raw_path[:200], env or ""), request_id)
    route = state.router.match(request.path, request.method, request.headers.get("Accept", ""))
    if route is not None and route.kind == "realtime":
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await realtime.handle_upgrade(request, state, route, env, path_qs,
                                                 request_id)
        # Never proxied (nor counted) as realtime: RFC 9110 §15.5.22 names the upgrade.
        metrics.INVALID_REQUESTS.labels("websocket-required").inc()
        return websocket_required(env).response(
            {"Upgrade": "websocket", "Connection": "Upgrade"}, request_id)
    body: bytes | AsyncIterable[bytes] | None = None
    function = ""
    # A CORS preflight costs no call unless its route says so; it is still decided (QPS, the
    # environment's lifecycle), and what it runs is metered (a function's slot and GBs).
    preflight = (route is not None and request.method == "OPTIONS"
                 and route.route.preflight == "free" and _is_preflight(request))
    if preflight and route is not None and route.actions is not None:
        route = route.actions["auth"]  # no body to name an action yet: counted as nothing
    if route is not None and route.actions is not None:
        try:  # the operation is in the body: read, classify, and check its env
            action = await _read_in_time(read_action(request, route, env), gw, env)
        except Problem as problem:
            return _refused_early(problem, request_id)
        route, body, env, function = action.route, action.body, action.env, action.function
    elif route is not None and route.kind == "function":
        function = route.function_name(request.path) or ""
    if env is None:
        return _refused_early(missing_environment(state.env_suffixes), request_id)
    if route is None:
        return _refused_early(route_not_found(request.path, env), request_id)

    extra: dict[str, str] = {}
    mode = state.env_modes.get(env, gw.enforcement)
    if mode == "off":
        _OFF.inc()
        return await state.pool.forward(request, route, env, path_qs, request_id, extra,
                                        body=body)

    slot = ""
    if route.kind == "function" and route.route.concurrency:
        if not function:
            return _refused_early(invalid_function(request.path, env), request_id)
        slot = "fn:" + function
    needs = route.needs_write if request.method in WRITE_METHODS else route.needs
    cost = 0 if preflight else route.cost
    #: A stream's extra cost: charged after a stream nobody asked for (``after``), or
    #: charged up front when the intent could not be read and given back after a response
    #: that is no stream (``back``).
    after = back = 0
    if route.stream_extra and not preflight:
        intent: bool | None = streams.asks_by_headers(request) or None
        if intent is None and request.body_exists and body is None:
            try:
                prefix, whole = await _read_in_time(
                    streams.read_prefix(request, route.route.stream_probe_bytes), gw, env)
            except Problem as problem:
                return _refused_early(problem, request_id)
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
    decision = await decide(state.limiter, env, route.kind, cost, slot, needs)
    if isinstance(decision, Problem):
        return decision.response(request_id=request_id)
    if not decision.admitted:
        if (decision.outcome is Outcome.ISOLATED and route.kind == "function"
                and request.headers.get("X-Invocation-Type", "").lower() == "event"):
            try:
                queued: bytes | None = await _read_in_time(
                    _whole(request, body, QUEUE_MAX_BODY), gw, env)
            except Problem as problem:
                return _refused_early(problem, request_id)
            return await _queue_invocation(state, request, env, path_qs, queued)
        refused = refusal(decision, env)
        decisions_log.info("refused %s %s: %s", env, route.route.name or route.route.prefix,
                           refused.type_suffix, extra={
                               "env": env, "route": route.route.name or route.route.prefix,
                               "meter": refused.meter, "reason": refused.type_suffix,
                               "status": refused.status, "request_id": request_id})
        return refused.response(ratelimit_headers(decision), request_id)
    if decisions_log.isEnabledFor(logging.DEBUG):
        decisions_log.debug("admitted %s %s", env, route.route.name or route.route.prefix,
                            extra={"env": env, "route": route.route.name or route.route.prefix,
                                   "reason": "bypassed" if decision.store_bypassed else
                                   "shadow" if decision.flags & Flag.SHADOW_REFUSAL else
                                   "admitted", "request_id": request_id})
    if decision.store_bypassed:
        extra["X-Quotagate-Bypass"] = "store-unavailable"
    elif decision.flags & Flag.SHADOW_REFUSAL:
        extra["X-Quotagate-Shadow"] = "would-refuse"
    extra.update(ratelimit_headers(decision))
    holds = decision.slot_held
    tally = Tally()
    if holds:
        metrics.FUNCTION_SLOTS.inc()
    try:
        return await state.pool.forward(request, route, env, path_qs, request_id, extra,
                                        tally, body)
    finally:
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


def _is_preflight(request: web.Request) -> bool:
    """A CORS preflight (Fetch standard): OPTIONS naming an Origin and the method it asks
    for, without a body."""
    headers = request.headers
    return ("Origin" in headers and "Access-Control-Request-Method" in headers
            and not request.body_exists)


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


#: How the public listener's server is made: request bodies are not decompressed, so what
#: is forwarded is what the client sent, with its own Content-Encoding and Content-Length (a
#: decoded body under the client's gzip headers reached upstreams broken).
SERVER_KWARGS: dict[str, Any] = {"auto_decompress": False}


def init_app(config: Config, store_url: str, clock: Clock | None = None) -> web.Application:
    """The public proxy application."""
    app = web.Application(client_max_size=0)
    app[STATE] = build_state(config, store_url, clock)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_close_sockets)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


# ------------------------------------------------------------------------------ admin


ADMIN_STATE = web.AppKey("admin_state", GatewayState)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[ADMIN_STATE]
    checks: dict[str, str] = {}
    try:
        pong = await state.limiter.store.execute("PING")
        checks["store"] = "ok" if pong == b"PONG" else f"unexpected reply {pong!r}"
        if not await state.limiter.scripts_loaded():  # flushed: load again, then say so
            await state.limiter.load_scripts()
        checks["scripts"] = "ok" if await state.limiter.scripts_loaded() else "not loaded"
    except StoreError as exc:
        checks["store"] = f"unreachable: {exc}"
    checks["environments"] = "ok" if state.synced else "not yet written to the store"
    clock = state.limiter.clock
    checks["clock"] = ("ok" if not isinstance(clock, StoreClock) or clock.synced
                       else "the store's clock not sampled yet")
    ready = all(v == "ok" for v in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


async def metrics_view(request: web.Request) -> web.Response:
    state = request.app[ADMIN_STATE]
    if state.config.gateway.metrics_auth:
        refused = control_api.refuse_without_token(request)
        if refused is not None:
            return refused
    metrics.BACKLOG.set(len(state.limiter.backlog))
    registry = request.app.get(METRICS_REGISTRY) or REGISTRY
    return web.Response(body=generate_latest(registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


METRICS_REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


def init_admin_app(
    state: GatewayState, registry: CollectorRegistry | None = None, token: str | None = None
) -> web.Application:
    """The admin listener: health, readiness, metrics and the admin API (``/admin/v1``,
    bearer ``token``, default from QUOTAGATE_ADMIN_TOKEN). Never on the public port."""
    app = web.Application(client_max_size=16 * 1024 * 1024)  # ingestion batches
    app[ADMIN_STATE] = state
    envs = Environments(state.redis, lambda: state.config,  # type: ignore[arg-type]
                        state.limiter.clock)
    control_api.install(app, envs, state.limiter, token, on_renewed=state.renewed)
    if registry is not None:
        app[METRICS_REGISTRY] = registry
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    return app
