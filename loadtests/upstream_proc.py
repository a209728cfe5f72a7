"""The benchmark's upstream: quotagate's demo upstream (``{"ok":true}`` for any path) on uvloop,
in its own process.

    python loadtests/upstream_proc.py PORT [--reuse-port]

``--reuse-port`` lets several of these share one port (SO_REUSEPORT), so the benchmark can run
more than one upstream process when a single one is the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop
from aiohttp import web

from quotagate.demo.upstream import make_upstream_app


async def serve(port: int, reuse_port: bool) -> None:
    runner = web.AppRunner(make_upstream_app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_port=reuse_port or None,
                      backlog=2048).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("--reuse-port", action="store_true")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.reuse_port))


if __name__ == "__main__":
    main()
