"""The ``Server`` header of every response quotagate makes: ``quotagate``, never the Python and
aiohttp versions aiohttp would otherwise announce (a proxied response keeps its upstream's)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

SERVER = "quotagate"


async def name_the_server(request: web.Request, response: web.StreamResponse) -> None:
    """An ``on_response_prepare`` signal: runs after aiohttp put its default in."""
    if response.headers.get("Server", SERVER_SOFTWARE) == SERVER_SOFTWARE:
        response.headers["Server"] = SERVER
