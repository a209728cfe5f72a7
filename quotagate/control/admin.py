"""The admin listener: health, readiness, metrics and the admin API (``/admin/v1``). Never on
the public port."""

from __future__ import annotations

from importlib import resources

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from quotagate import __version__
from quotagate.common import metrics
from quotagate.common.clock import StoreClock
from quotagate.common.server import name_the_server
from quotagate.control import api as control_api
from quotagate.control.envs import Environments
from quotagate.control.runtime import Runtime
from quotagate.control.tokens import READ
from quotagate.limiter.errors import StoreError

RUNTIME = web.AppKey("runtime", Runtime)
METRICS_REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    limiter = runtime.limiter
    checks: dict[str, str] = {}
    try:
        pong = await limiter.store.execute("PING")
        checks["store"] = "ok" if pong == b"PONG" else f"unexpected reply {pong!r}"
        if not await limiter.scripts_loaded():  # flushed: load again, then say so
            await limiter.load_scripts()
        checks["scripts"] = "ok" if await limiter.scripts_loaded() else "not loaded"
    except StoreError as exc:
        checks["store"] = f"unreachable: {exc}"
    checks["environments"] = "ok" if runtime.synced else "not yet written to the store"
    clock = limiter.clock
    checks["clock"] = ("ok" if not isinstance(clock, StoreClock) or clock.synced
                       else "the store's clock not sampled yet")
    ready = all(v == "ok" for v in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


#: The console's files (control/console/): a page, its script and its style, no build step.
CONSOLE = resources.files("quotagate.control").joinpath("console")
CONSOLE_TYPES = {"console.js": "text/javascript", "console.css": "text/css"}
#: Only this listener's own files, no inline script or style attribute, never in a frame.
CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache"}


async def console_page(request: web.Request) -> web.Response:
    """The console (docs/operations.md, *Console*): a page that signs in with a token of the
    admin API and does everything through it; without a token it shows nothing but the
    sign-in form."""
    return web.Response(body=CONSOLE.joinpath("index.html").read_bytes(),
                        content_type="text/html", charset="utf-8", headers=CONSOLE_HEADERS)


async def console_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in CONSOLE_TYPES:
        raise web.HTTPNotFound(text="no such file of the console")
    return web.Response(body=CONSOLE.joinpath(name).read_bytes(),
                        content_type=CONSOLE_TYPES[name], charset="utf-8",
                        headers=CONSOLE_HEADERS)


async def metrics_view(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    if runtime.config.gateway.metrics_auth:
        refused = await control_api.refuse_unless(request, READ)
        if refused is not None:
            return refused
    metrics.BACKLOG.set(len(runtime.limiter.backlog))
    registry = request.app.get(METRICS_REGISTRY) or REGISTRY
    return web.Response(body=generate_latest(registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def init_admin_app(
    runtime: Runtime, registry: CollectorRegistry | None = None, token: str | None = None
) -> web.Application:
    """The admin listener: health, readiness, metrics and the admin API (``/admin/v1``,
    bearer ``token``, default from QUOTAGATE_ADMIN_TOKEN)."""
    app = web.Application(client_max_size=16 * 1024 * 1024)  # ingestion batches
    app[RUNTIME] = runtime
    app.on_response_prepare.append(name_the_server)
    envs = Environments(runtime.redis, lambda: runtime.config,  # type: ignore[arg-type]
                        runtime.limiter.clock)
    control_api.install(app, envs, runtime.limiter, token, on_renewed=runtime.renewed,
                        trail=runtime.audit)
    if registry is not None:
        app[METRICS_REGISTRY] = registry
    app.router.add_get("/console", console_page)
    app.router.add_get("/console/", console_page)
    app.router.add_get("/console/{name}", console_file)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    return app
