"""``quotagate serve``: the embedded store (if no URL is configured), N worker processes sharing
the public port with SO_REUSEPORT, the admin listener in worker 0.

The gateway's composition with ``app.py``: each worker serves the public application
(``app.init_app``: the HTTP and realtime doors) and, on its state, plugin mode's listeners
(``plugin/authz.py``, ``plugin/rls.py``) and the admin listener (control/admin.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import secrets
import signal
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

import setproctitle
from aiohttp import web
from prometheus_client import CollectorRegistry

from quotagate.common.logs import TEXT_FORMAT, configure
from quotagate.control.admin import init_admin_app
from quotagate.gateway.app import SERVER_KWARGS, STATE, init_app
from quotagate.gateway.clients import (
    PUBLIC,
    ConnectionCap,
    Listener,
    connection_caps,
    descriptors_needed,
    raise_nofile,
    server_kwargs,
)
from quotagate.gateway.plugin.authz import authz_server
from quotagate.gateway.plugin.tickets import KEY_ENV, Tickets
from quotagate.limiter.embedded import EmbeddedValkey, die_with_parent
from quotagate.settings import Config, load_config

if TYPE_CHECKING:
    from grpclib.server import Server as GrpcServer

log = logging.getLogger("quotagate.server")


class StartError(RuntimeError):
    """The server cannot start (a port in use, the data directory owned by another): one
    line for the operator, nothing left running."""


async def _listen(runner: web.BaseRunner, hostport: str, what: str, **kw: Any) -> None:
    host, port = _split(hostport)
    try:
        await web.TCPSite(runner, host, port, **kw).start()
    except OSError as exc:
        raise StartError(f"cannot listen on {hostport} ({what}): {exc.strerror or exc}"
                         ) from None


def _split(hostport: str) -> tuple[str, int]:
    host, port = hostport.rsplit(":", 1)
    return host.strip("[]"), int(port)


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        log.warning("uvloop not available, using the default event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


#: Cyclic GC thresholds of a serving process. Python's default (700 net allocations) runs a
#: young collection every few requests and an older one every few hundred, pausing every
#: request in flight for up to a few ms; nearly everything a request allocates is freed by
#: reference counting, so collecting 14 times less often finds the same garbage with a
#: fraction of the pauses (`docs/benchmarks.md`, open-loop latency).
GC_THRESHOLDS = (10_000, 50, 100)


def tune_gc() -> None:
    """Once the process is set up: what it allocated to start (modules, config, the app) is
    moved out of the collector's sight for good (``gc.freeze``), and collections are rarer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def run_gateway(
    config: Config,
    store_url: str,
    *,
    admin: bool = True,
    reuse_port: bool = False,
    stop: asyncio.Event | None = None,
    registry: CollectorRegistry | None = None,
) -> None:
    """Serve the public (and optionally the admin) listener until ``stop`` is set or a signal."""
    gw = config.gateway
    nofile = raise_nofile()
    # Each listener's connection cap is its own share of the descriptor limit (clients.py):
    # a flood on one of them cannot take the descriptors another needs.
    caps = connection_caps(gw.clients, nofile, [name for name, on in (
        ("authz", gw.authz_listen), ("grpc", gw.authz.grpc_listen), ("admin", admin)) if on])
    listeners = {name: Listener(name, cap) for name, cap in caps.items()}
    app = init_app(config, store_url)
    drain = gw.drain_timeout_ms / 1000
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=drain,
                           **SERVER_KWARGS, **server_kwargs(gw.clients))
    await runner.setup()
    assert runner.server is not None
    ConnectionCap(runner.server, listeners[PUBLIC])
    log.info("client limits: request head within %d ms, bodies read within %d ms, at most %s "
             "connections (descriptor limit %d)", gw.clients.header_timeout_ms,
             gw.clients.body_timeout_ms, ", ".join(
                 f"{cap} {name}" for name, cap in caps.items()), nofile)
    if (needed := descriptors_needed(caps)) > nofile:
        log.warning("the listeners' connection caps (%s) may hold %d descriptors, more than "
                    "the limit of %d: a flood on one listener may leave another unable to "
                    "accept; lower clients.*max_connections or raise the limit", ", ".join(
                        f"{name} {cap}" for name, cap in caps.items()), needed, nofile)
    admin_runner = None
    authz_runner: web.ServerRunner | None = None
    grpc: GrpcServer | None = None
    tickets = Tickets()
    try:
        await _listen(runner, gw.listen, "listen", reuse_port=reuse_port, backlog=2048)
        if gw.authz_listen:  # plugin mode: the decision service, on the proxy's state
            authz_runner = web.ServerRunner(authz_server(app[STATE], tickets),
                                            handle_signals=False, shutdown_timeout=drain)
            await authz_runner.setup()
            assert authz_runner.server is not None
            ConnectionCap(authz_runner.server, listeners["authz"])
            await _listen(authz_runner, gw.authz_listen, "authz_listen",
                          reuse_port=reuse_port, backlog=2048)
        if gw.authz.grpc_listen:  # plugin mode: Envoy's rate limit service
            from quotagate.gateway.plugin.rls import grpc_server  # (gRPC stack loaded only here)

            grpc = grpc_server(app[STATE], tickets, listeners["grpc"])
            host, port = _split(gw.authz.grpc_listen)
            try:
                await grpc.start(host, port, reuse_port=reuse_port)
            except OSError as exc:
                raise StartError(f"cannot listen on {gw.authz.grpc_listen} "
                                 f"(authz.grpc_listen): {exc.strerror or exc}") from None
        if admin:
            admin_runner = web.AppRunner(
                init_admin_app(app[STATE].runtime, registry), access_log=None,
                handle_signals=False, shutdown_timeout=drain, **server_kwargs(gw.clients))
            await admin_runner.setup()
            assert admin_runner.server is not None
            ConnectionCap(admin_runner.server, listeners["admin"])
            await _listen(admin_runner, gw.admin_listen, "admin_listen")
    except StartError:
        await _close_grpc(grpc)
        for extra in (admin_runner, authz_runner):
            if extra is not None:
                await extra.cleanup()
        await runner.cleanup()
        raise
    tune_gc()
    log.info("gateway listening on http://%s (admin %s%s) pid %d", gw.listen,
             gw.admin_listen if admin else "in worker 0",
             "".join(f", {what} {where}" for what, where in (
                 ("decisions", gw.authz_listen), ("rate limit service", gw.authz.grpc_listen))
                 if where), os.getpid())
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def _reload() -> None:
        task = loop.create_task(app[STATE].runtime.reload("SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, _reload)
    try:
        await stop.wait()
    finally:
        log.info("stopping gateway pid %d: no new connections; requests in flight get up to "
                 "%.1f s (drain_timeout_ms)", os.getpid(), drain)
        runners = [r for r in (runner, admin_runner, authz_runner) if r is not None]
        for each in runners:  # every listener stops accepting at once
            for site in list(each.sites):
                await site.stop()
        await _close_grpc(grpc)
        # The admin and plugin listeners drain together, then the public one (whose
        # cleanup stops the store client they use).
        await asyncio.gather(*(r.cleanup() for r in runners[1:]))
        await runner.cleanup()


async def _close_grpc(server: GrpcServer | None) -> None:
    if server is not None:
        server.close()
        await server.wait_closed()


def _worker(config_path: str, store_url: str, index: int, log_level: str,
            log_format: str = "text", parent: int = 0) -> None:
    # A worker ends with the serve process, however that ends (a kill -9 included).
    die_with_parent(parent or os.getppid())
    setproctitle.setproctitle(f"quotagate worker {index}")  # as ps shows it
    configure(log_level, log_format)
    install_uvloop()
    config = load_config(config_path)
    registry = None
    if index == 0 and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import CollectorRegistry, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    try:
        asyncio.run(run_gateway(config, store_url, admin=index == 0, reuse_port=True,
                                registry=registry))
    except StartError as exc:
        log.error("%s", exc)
        sys.exit(1)


LOG_FORMAT = TEXT_FORMAT


def serve(config_path: str, workers: int = 1, log_level: str = "INFO",
          log_format: str = "text") -> int:
    config = load_config(config_path)
    embedded: EmbeddedValkey | None = None
    store_url = config.gateway.store.url
    if not store_url:
        data_dir = config.resolve(config.gateway.store.data_dir)
        log.info("no store.url configured: starting the embedded Valkey in %s", data_dir)
        try:
            embedded = EmbeddedValkey(data_dir).start()
        except (RuntimeError, OSError) as exc:  # owned by another (DataDirInUse), not
            raise StartError(str(exc)) from None   # writable, or the store did not start
        store_url = embedded.url
    try:
        if workers <= 1:
            install_uvloop()
            asyncio.run(run_gateway(config, store_url))
            return 0
        return _serve_workers(config_path, store_url, workers, log_level, log_format)
    finally:
        if embedded is not None:
            embedded.stop()


#: A worker that dies is started again after this long, doubled each time it dies again
#: within RESTART_WINDOW_S (at most RESTART_MAX_S); this many deaths within the window is a
#: crash loop: the server stops and exits non-zero (its supervisor decides what next).
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 10.0
RESTART_WINDOW_S = 60.0
RESTART_LIMIT = 5


def _serve_workers(config_path: str, store_url: str, workers: int, log_level: str,
                   log_format: str) -> int:
    with tempfile.TemporaryDirectory(prefix="quotagate-metrics-") as metrics_dir:
        # Set before the workers import prometheus_client: they aggregate through files here.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        # Plugin mode: every worker signs and accepts the same decision tickets (a done call
        # may reach another worker than the decision).
        os.environ.setdefault(KEY_ENV, secrets.token_hex(32))
        ctx = multiprocessing.get_context("spawn")

        def start(index: int) -> multiprocessing.process.BaseProcess:
            proc = ctx.Process(target=_worker,
                               args=(config_path, store_url, index, log_level, log_format,
                                     os.getpid()),
                               name=f"quotagate-worker-{index}")
            proc.start()
            return proc

        procs = [start(i) for i in range(workers)]
        log.info("started %d workers: %s", workers, ", ".join(str(p.pid) for p in procs))
        stopping = False

        def _stop(signum: int, _frame: object) -> None:
            nonlocal stopping
            stopping = True
            for p in procs:
                if p.is_alive() and p.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGTERM)

        def _hup(signum: int, _frame: object) -> None:
            for p in procs:  # each worker reloads (and validates) for itself
                if p.is_alive() and p.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGHUP)

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGHUP, _hup)
        # A worker that dies is started again (its slots come back with its lease; the
        # others keep serving); dying RESTART_LIMIT times within RESTART_WINDOW_S gives up.
        deaths: list[float] = []
        due: dict[int, float] = {}  # index -> monotonic time its restart is due
        crash_loop = False
        while not stopping:
            time.sleep(0.2)
            now = time.monotonic()
            for index, proc in enumerate(procs):
                if stopping:
                    break
                if index in due:
                    if now >= due[index]:
                        del due[index]
                        procs[index] = start(index)
                        log.warning("worker %d started again (pid %s)", index,
                                    procs[index].pid)
                    continue
                if proc.is_alive():
                    continue
                deaths[:] = [d for d in deaths if now - d < RESTART_WINDOW_S] + [now]
                if len(deaths) >= RESTART_LIMIT:
                    log.error("worker %d exited (code %s): %d worker deaths within %.0f s, "
                              "a crash loop — stopping", index, proc.exitcode, len(deaths),
                              RESTART_WINDOW_S)
                    crash_loop = True
                    break
                delay = min(RESTART_FIRST_S * 2 ** (len(deaths) - 1), RESTART_MAX_S)
                due[index] = now + delay
                log.error("worker %d exited (code %s); starting it again in %.1f s", index,
                          proc.exitcode, delay)
            if crash_loop:
                _stop(signal.SIGTERM, None)
                stopping = True
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        return 1 if crash_loop else 0
