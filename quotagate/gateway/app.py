"""The gateway's public application (``init_app``): the public listener's composition.

It joins the front doors that share the public port over one ``GatewayState`` (``STATE``):
every request goes to the HTTP door's handler (``gateway/proxy/handler.py``), which hands a
WebSocket upgrade on a realtime route to the realtime door (``gateway/realtime/upgrade.py``)
through the state (``GatewayState.upgrade``, set here), so neither door imports the other.
Plugin mode's listeners are composed by ``gateway/server.py`` on the same state.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from quotagate.common.clock import Clock
from quotagate.common.server import name_the_server
from quotagate.control.runtime import build_runtime
from quotagate.gateway.proxy.handler import handle
from quotagate.gateway.realtime.upgrade import handle_upgrade
from quotagate.gateway.state import STATE, GatewayState
from quotagate.gateway.upstream import UpstreamPool
from quotagate.settings import Config

__all__ = ["SERVER_KWARGS", "STATE", "init_app"]


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.pool.start()
    await state.runtime.start(upstream_base=state.upstream_base, session=state.pool.session,
                              admit=state.admit_replay)
    yield
    await state.runtime.stop()
    await state.pool.close()
    if state.access_log is not None:
        state.access_log.close()


async def _close_sockets(app: web.Application) -> None:
    """On shutdown, realtime sockets are told to go away (their slots go back at cleanup)."""
    state = app[STATE]
    sockets = [*(s for peers in state.sockets.values() for s in peers), *state.unnamed_sockets]
    await asyncio.gather(*(s.shutdown() for s in sockets), return_exceptions=True)


#: How the public listener's server is made: request bodies are not decompressed, so what
#: is forwarded is what the client sent, with its own Content-Encoding and Content-Length (a
#: decoded body under the client's gzip headers reached upstreams broken).
SERVER_KWARGS: dict[str, Any] = {"auto_decompress": False}


def init_app(config: Config, store_url: str, clock: Clock | None = None) -> web.Application:
    """The public proxy application."""
    app = web.Application(client_max_size=0)
    app[STATE] = GatewayState(build_runtime(config, store_url, clock), UpstreamPool(
        config.gateway.upstream), upgrade=handle_upgrade)
    app.cleanup_ctx.append(_lifecycle)
    app.on_response_prepare.append(name_the_server)
    app.on_shutdown.append(_close_sockets)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
