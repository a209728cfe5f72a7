"""Arm D of the benchmark: the same streaming passthrough as quotagate (its ``UpstreamPool``),
but each request is decided by the ``limits`` library's async Redis strategy instead of
quotagate's script. This is the Python peer a user would otherwise pick.

    python loadtests/limits_proxy.py --port P --upstream http://127.0.0.1:U \\
        --storage async+redis://127.0.0.1:S --strategy fixed|moving|sliding \\
        [--limit 10000000/second] [--implementation redispy]

Per request: read the environment id from ``X-CloudBase-Env``, ``await limiter.hit(item, env)``
(one script call in the store), then 429 or forward to the upstream. ``limits`` defaults to the
``coredis`` client; the benchmark asks for ``redispy`` (redis-py + hiredis, what is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import uuid

import uvloop
from aiohttp import web
from limits import parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)

from quotagate.gateway.routing import compile_route
from quotagate.gateway.server import tune_gc
from quotagate.gateway.upstream import UpstreamPool
from quotagate.settings.schema import Route, UpstreamSettings

STRATEGIES: dict[str, type[FixedWindowRateLimiter | MovingWindowRateLimiter
                            | SlidingWindowCounterRateLimiter]] = {
    "fixed": FixedWindowRateLimiter,
    "moving": MovingWindowRateLimiter,
    "sliding": SlidingWindowCounterRateLimiter,
}
ENV_HEADER = "X-CloudBase-Env"


def make_app(upstream: str, storage_uri: str, strategy: str, limit: str,
             implementation: str) -> web.Application:
    # One key prefix per strategy: they would all use the same key (LIMITS:LIMITER/<env>/...),
    # a list for the moving window and a counter for the others, so an arm run just after
    # another would get WRONGTYPE errors (500s) until the other's key expired.
    storage = RedisStorage(storage_uri, implementation=implementation,  # type: ignore[arg-type]
                           key_prefix=f"LIMITS-{strategy}")
    limiter = STRATEGIES[strategy](storage)
    item = parse(limit)
    route = compile_route(Route(prefix="/", upstream=upstream, kind="function"))
    pool = UpstreamPool(UpstreamSettings())

    async def handle(request: web.Request) -> web.StreamResponse:
        env = request.headers.get(ENV_HEADER, "")
        if not env:
            return web.json_response({"title": "no environment"}, status=400)
        if not await limiter.hit(item, env):
            return web.json_response({"title": "rate limited"}, status=429)
        return await pool.forward(request, route, env, request.raw_path, uuid.uuid4().hex, {})

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        await pool.start()
        yield
        await pool.close()

    app = web.Application(client_max_size=0)
    app.cleanup_ctx.append(lifecycle)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(args: argparse.Namespace) -> None:
    app = make_app(args.upstream, args.storage, args.strategy, args.limit, args.implementation)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port, backlog=2048).start()
    tune_gc()  # the same process set-up as quotagate's: the arms differ only in the limiter
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--storage", required=True, help="e.g. async+redis://127.0.0.1:6379")
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), required=True)
    parser.add_argument("--limit", default="10000000/second")
    parser.add_argument("--implementation", default="redispy",
                        choices=["redispy", "coredis", "valkey"])
    args = parser.parse_args()
    uvloop.run(serve(args))


if __name__ == "__main__":
    main()
